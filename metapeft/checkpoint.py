"""Checkpoints of the meta-learned state: written atomically, loaded only whole and only if they fit the config.

A checkpoint directory holds ``meta.safetensors`` (what the outer loop learned), ``frozen.safetensors`` (the frozen
tree: backbone, AdaLoRA's masks; absent for peft=none) and ``config.yaml`` (the resolved config of the run).
``train=false checkpoint=PATH`` evaluates with that config (``evaluation_config``), so nothing needs repeating.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metapeft import io
from metapeft.backend import mx, utils
from metapeft.config import CONF_DIR, GROUPS, ModeConfig, RunConfig
from metapeft.errors import ConfigError
from metapeft.registry import ALGORITHMS, MODELS, PEFT_METHODS, TASKS

log = logging.getLogger(__name__)


def checkpoint_directory(path: str | Path) -> Path:
    """A run's ``checkpoint/`` folder, given either it or the run directory that holds it."""
    directory = Path(path).expanduser()
    return directory / "checkpoint" if (directory / "checkpoint").is_dir() else directory


def saved_config(path: str | Path) -> tuple[Path, DictConfig]:
    """The checkpoint folder of a saved run (given it or its run directory) and the run's resolved config."""
    directory = checkpoint_directory(path)
    if not (directory / "config.yaml").is_file():
        raise ConfigError("checkpoint", f"{directory} holds no config.yaml: give a run directory or its checkpoint/")
    try:
        saved = OmegaConf.load(directory / "config.yaml")
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as error:
        raise ConfigError("checkpoint", f"{directory / 'config.yaml'} is not readable YAML ({error})") from error
    missing = [key for key in (*GROUPS, "seed", "evaluation") if not isinstance(saved, DictConfig) or key not in saved]
    if missing:
        raise ConfigError("checkpoint", f"{directory / 'config.yaml'} is not a metapeft run config (it has no "
                          f"{', '.join(missing)}): give a run directory or its checkpoint/")
    return directory, with_later_keys(saved)


def with_later_keys(saved: DictConfig) -> DictConfig:
    """A run saved before a key existed gets that key's default (the behaviour the run had then, e.g.
    ``model.init=pytorch``), so older checkpoints still evaluate: the keys of its algorithm, task, model and PEFT
    schemas, its mode's (the schema's default, else ``conf/mode/<name>.yaml``'s) and the top-level ones
    (``evaluation``, ``finetune``, ...). What was filled in is logged."""
    added: list[str] = []

    def fill(node: DictConfig, defaults: dict, prefix: str) -> None:
        for key, value in defaults.items():
            if key not in node:
                node[key] = value  # an interpolation stays one, resolved against the saved run's config
                added.append(prefix + str(key))
            elif isinstance(value, dict) and OmegaConf.is_dict(node._get_node(key)):
                fill(node[key], value, f"{prefix}{key}.")

    for group, registry in (("algorithm", ALGORITHMS), ("task", TASKS), ("model", MODELS), ("peft", PEFT_METHODS)):
        try:
            fill(saved[group], plain(OmegaConf.structured(registry.schema(saved[group].name))), f"{group}.")
        except (ConfigError, OmegaConfBaseException):
            continue  # an unknown name or a changed type: left as saved, and refused later where it is used
    # a mode key with a default in the schema: the behaviour before it existed; one without: the mode file's value
    fill(saved.mode, plain(OmegaConf.structured(ModeConfig)), "mode.")
    mode_file = CONF_DIR / "mode" / f"{saved.mode.get('name')}.yaml"
    if mode_file.is_file():
        mode = OmegaConf.to_container(OmegaConf.load(mode_file), resolve=False)
        fill(saved.mode, {k: v for k, v in mode.items() if k != "defaults"}, "mode.")
    fill(saved, {k: v for k, v in plain(OmegaConf.structured(RunConfig)).items() if k not in GROUPS}, "")
    if added:
        log.warning("the saved run predates %s: %s take today's defaults", "these keys" if len(added) > 1
                    else "this key", ", ".join(added))
    return saved


def plain(structured: DictConfig) -> dict:
    """A structured config's values as plain containers (interpolations kept, required values left out)."""
    return {k: v for k, v in OmegaConf.to_container(structured, resolve=False, enum_to_str=True).items()
            if v != "???"}


def evaluation_config(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """The config that evaluates the saved run ``cfg.checkpoint``: the run's own resolved config, with this
    command's single-key overrides on top (``shots.eval``, ``mode.num_eval_tasks``, ``seed``, ...). A group
    override that differs from the run's own choice is refused: the checkpoint was trained with the other one."""
    directory, saved = saved_config(cfg.checkpoint)
    OmegaConf.set_struct(saved, True)
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key, value = override.key_or_group, override.value()
        if key.startswith("hydra.") or key in ("train", "checkpoint"):
            continue
        if key in GROUPS:
            if value != saved[key].name:
                raise ConfigError(key, f"the checkpoint in {directory} was meta-trained with {key}="
                                       f"{saved[key].name}, not {key}={value}: drop the override or give a "
                                       f"checkpoint of a {key}={value} run")
            continue
        if key == "experiment" or override.is_delete():
            raise ConfigError(key, f"'{override.input_line}' cannot change a saved run; it evaluates with "
                                   f"the config in {directory / 'config.yaml'}")
        try:
            OmegaConf.update(saved, key, value, merge=True, force_add=override.is_add())
        except OmegaConfBaseException as error:
            raise ConfigError(key, f"the saved run's config has no key {key} ({error})") from error
    saved.train, saved.checkpoint = False, str(directory)
    return saved


def save_checkpoint(directory: Path, meta: dict, frozen: dict, cfg: DictConfig) -> None:
    io.write_text(directory / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    io.save_tree(directory / "meta.safetensors", meta)
    if frozen:
        io.save_tree(directory / "frozen.safetensors", frozen)


def _load_flat(path: Path) -> dict[str, mx.array]:
    if not path.exists():
        raise ConfigError("checkpoint", f"{path} is missing")
    try:
        arrays = mx.load(str(path))
    except Exception as error:  # noqa: BLE001 - any unreadable file is reported the same way
        raise ConfigError("checkpoint", f"{path} is truncated or corrupt ({type(error).__name__}: {error})") from error
    if not isinstance(arrays, dict):
        raise ConfigError("checkpoint", f"{path} does not hold named arrays")
    return arrays


def _check(name: str, loaded: dict[str, mx.array], expected: dict, path: Path) -> dict:
    """``loaded`` arranged as ``expected`` if every name, shape and dtype matches; else a ConfigError saying what
    differs."""
    want = dict(utils.tree_flatten(expected))
    missing, extra = sorted(want.keys() - loaded.keys()), sorted(loaded.keys() - want.keys())
    shapes = [f"{k}: checkpoint {tuple(loaded[k].shape)} {loaded[k].dtype}, "
              f"config {tuple(want[k].shape)} {want[k].dtype}"
              for k in sorted(want.keys() & loaded.keys())
              if loaded[k].shape != want[k].shape or loaded[k].dtype != want[k].dtype]
    if missing or extra or shapes:
        problems = [f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "",
                    f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}" if extra else "",
                    "; ".join(shapes[:5])]
        raise ConfigError("checkpoint", f"{path} does not match the config's {name} tree (different algorithm, "
                          f"PEFT method, backbone or task?): " + "; ".join(p for p in problems if p))
    return utils.tree_unflatten([(k, loaded[k]) for k, _ in utils.tree_flatten(expected)])


def load_checkpoint(directory: Path, expected_meta: dict, expected_frozen: dict) -> tuple[dict, dict]:
    """(meta, frozen) from ``directory``, checked against trees built from the config; nothing is half-loaded."""
    directory = checkpoint_directory(directory)
    if not directory.is_dir():
        raise ConfigError("checkpoint", f"{directory} is not a directory (expected a run's checkpoint/ folder)")
    meta = _check("meta-learned", _load_flat(directory / "meta.safetensors"), expected_meta,
                  directory / "meta.safetensors")
    frozen = expected_frozen
    if expected_frozen:
        frozen = _check("frozen", _load_flat(directory / "frozen.safetensors"), expected_frozen,
                        directory / "frozen.safetensors")
    return meta, frozen
