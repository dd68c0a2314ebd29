"""Checkpoints of the meta-learned state: written atomically, loaded only whole and only if they fit the config.

A checkpoint directory holds ``meta.safetensors`` (what the outer loop learned), ``frozen.safetensors`` (the frozen
tree: backbone, AdaLoRA's masks; absent for peft=none) and ``config.yaml`` (the resolved config of the run).
``train=false checkpoint=PATH`` evaluates with that config (``evaluation_config``), so nothing needs repeating.
"""
from __future__ import annotations

import logging
import math
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metapeft import io
from metapeft.backend import mx, utils
from metapeft.config import CONF_DIR, GROUPS, RunConfig
from metapeft.errors import ConfigError
from metapeft.registry import ALGORITHMS, MODELS, PEFT_METHODS, TASKS
from metapeft.train import TrainLog, TrainState

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
    schemas, its mode's (from ``conf/mode/<name>.yaml``) and the top-level ones (``evaluation``, ``finetune``, ...).
    What was filled in is logged."""
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


def _unflatten_like(expected: Any, flat: dict[str, mx.array], prefix: str, path: Path) -> Any:
    """The arrays saved under ``prefix`` arranged exactly as ``expected`` is (its dicts may have dotted keys)."""
    wanted = utils.tree_flatten(expected)
    bad = [k for k, v in wanted if f"{prefix}.{k}" not in flat or flat[f"{prefix}.{k}"].shape != v.shape]
    if bad:
        raise ConfigError("resume", f"{path} does not fit this run's {prefix} (first mismatch: {prefix}.{bad[0]}); "
                          "was it written by another configuration?")
    leaves = iter(flat[f"{prefix}.{k}"] for k, _ in wanted)
    return utils.tree_map(lambda _: next(leaves), expected)


@contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM while a training checkpoint is written: a stop lands after it, not inside it.

    The handlers are swapped for a recorder (a signal that arrived just before, whose Python handler has not run
    yet, is recorded too) and the recorded signals are raised again once the files are written."""
    received: list[int] = []
    try:
        previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                    for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in received:
            signal.raise_signal(number)


def save_training_state(directory: Path, state: TrainState, log: TrainLog, sampler: np.random.Generator,
                        job: list[str]) -> None:
    """Everything an interrupted run needs to continue: arrays in ``training.safetensors``, the rest (history,
    the task sampler's state, the overrides it belongs to) in ``training.json``, both stamped with the iteration."""
    arrays = {"meta": state.meta, "frozen": state.frozen, "optimizer": state.optimizer,
              "peft_state": state.peft_state or {}}
    if state.kept is not None:
        arrays["kept"] = {"meta": state.kept[0], "frozen": state.kept[1]}
    record = {"iteration": state.iteration, "validations_since_kept": state.validations_since_kept,
              "has_kept": state.kept is not None, "overrides": job, "sampler": sampler.bit_generator.state,
              "log": dict(vars(log))}
    with signals_deferred():
        io.save_tree(directory / "training.safetensors", arrays, metadata={"iteration": str(state.iteration)})
        io.write_json(directory / "training.json", record)


def load_training_state(directory: Path, expected: TrainState, log: TrainLog, sampler: np.random.Generator,
                        job: list[str]) -> TrainState:
    """The saved ``TrainState`` (arranged like ``expected``); restores ``log`` and ``sampler`` in place."""
    path = directory / "training.safetensors"
    try:
        record = io.read_json(directory / "training.json")
        flat, metadata = mx.load(str(path), return_metadata=True)
    except (OSError, ValueError, RuntimeError) as error:  # missing, truncated or corrupt
        raise ConfigError("resume", f"{directory}: the training state cannot be read ({type(error).__name__}: "
                          f"{error}); start a new run directory") from error
    if record["overrides"] != job:
        raise ConfigError("resume", f"{directory} holds the training state of a run with other overrides "
                          f"({' '.join(record['overrides'])}); resume it with those, or start a new run directory")
    if metadata.get("iteration") != str(record["iteration"]):
        raise ConfigError("resume", f"{directory}: training.safetensors and training.json are from different "
                          "iterations (stopped while writing them?); start a new run directory")
    meta = _unflatten_like(expected.meta, flat, "meta", path)
    frozen = _unflatten_like(expected.frozen, flat, "frozen", path)
    kept = None
    if record["has_kept"]:
        kept = (_unflatten_like(expected.meta, flat, "kept.meta", path),
                _unflatten_like(expected.frozen, flat, "kept.frozen", path))
    peft_state = expected.peft_state
    if expected.peft_state:
        peft_state = _unflatten_like(expected.peft_state, flat, "peft_state", path)
    restore_log(log, record["log"])
    sampler.bit_generator.state = record["sampler"]
    return TrainState(record["iteration"], meta, frozen, _unflatten_like(expected.optimizer, flat, "optimizer", path),
                      peft_state, kept, record["validations_since_kept"])


def restore_log(log: TrainLog, saved: dict) -> None:
    """Fill ``log`` in place from its saved ``vars`` (NaN came back from JSON as null)."""
    for key, value in saved.items():
        if key == "rows":
            value = [{k: math.nan if v is None else v for k, v in row.items()} for row in value]
        elif value is None:
            value = math.nan
        setattr(log, key, value)


def save_training_done(directory: Path, train: dict, log: TrainLog, job: list[str]) -> None:
    """Meta-training has finished and the checkpoint is written: ``trained.json`` holds what the run reports of
    its training, so that a run stopped during evaluation resumes there instead of meta-training again."""
    with signals_deferred():
        io.write_json(directory / "trained.json", {"overrides": job, "train": train, "log": dict(vars(log))})


def load_training_done(directory: Path, log: TrainLog, job: list[str]) -> dict:
    """The ``train`` facts of a run whose meta-training had finished (``save_training_done``); restores ``log``."""
    try:
        record = io.read_json(directory / "trained.json")
        train, saved_log, overrides = record["train"], record["log"], record["overrides"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError("resume", f"{directory}/trained.json cannot be read ({type(error).__name__}: {error}); "
                          "start a new run directory") from error
    if overrides != job:
        raise ConfigError("resume", f"{directory} holds the meta-training of a run with other overrides "
                          f"({' '.join(overrides)}); resume it with those, or start a new run directory")
    restore_log(log, saved_log)
    return train

