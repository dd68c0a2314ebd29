"""Checkpoints of the meta-learned state: written atomically, loaded only whole and only if they fit the config.

A checkpoint directory holds ``meta.safetensors`` (what the outer loop learned), ``frozen.safetensors`` (the frozen
tree: backbone, AdaLoRA's masks; absent for peft=none) and ``config.yaml`` (the resolved config of the run).
"""
from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from omegaconf import DictConfig, OmegaConf

from metapeft import io
from metapeft.errors import ConfigError


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
    """``loaded`` arranged as ``expected`` if every name, shape and dtype matches; else a ConfigError saying what differs."""
    want = dict(tree_flatten(expected))
    missing, extra = sorted(want.keys() - loaded.keys()), sorted(loaded.keys() - want.keys())
    shapes = [f"{k}: checkpoint {tuple(loaded[k].shape)} {loaded[k].dtype}, config {tuple(want[k].shape)} {want[k].dtype}"
              for k in sorted(want.keys() & loaded.keys())
              if loaded[k].shape != want[k].shape or loaded[k].dtype != want[k].dtype]
    if missing or extra or shapes:
        problems = [f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "",
                    f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}" if extra else "",
                    "; ".join(shapes[:5])]
        raise ConfigError("checkpoint", f"{path} does not match the config's {name} tree (different algorithm, "
                          f"PEFT method, backbone or task?): " + "; ".join(p for p in problems if p))
    return tree_unflatten([(k, loaded[k]) for k, _ in tree_flatten(expected)])


def load_checkpoint(directory: Path, expected_meta: dict, expected_frozen: dict) -> tuple[dict, dict]:
    """(meta, frozen) from ``directory``, checked against trees built from the config; nothing is half-loaded."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise ConfigError("checkpoint", f"{directory} is not a directory (expected a run's checkpoint/ folder)")
    meta = _check("meta-learned", _load_flat(directory / "meta.safetensors"), expected_meta,
                  directory / "meta.safetensors")
    frozen = expected_frozen
    if expected_frozen:
        frozen = _check("frozen", _load_flat(directory / "frozen.safetensors"), expected_frozen,
                        directory / "frozen.safetensors")
    return meta, frozen
