"""Atomic file writes: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from metapeft.backend import mx, utils
from metapeft.errors import WriteFailed


def _file_mode() -> int:
    """The mode an ordinary new file gets under the current umask (mkstemp's 0600 would survive the rename and
    keep colleagues on a shared file system from reading results and the pretraining cache)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_muted: list[Path] = []  # folders this process leaves to another (the other processes of a distributed run)


@contextlib.contextmanager
def muted(folder: Path):
    """Within it, writes under ``folder`` are skipped: the first process of a distributed run writes the run
    directory, the others compute the same and write nothing there."""
    _muted.append(Path(folder).resolve())
    try:
        yield
    finally:
        _muted.remove(Path(folder).resolve())


def _is_muted(path: Path) -> bool:
    return bool(_muted) and any(Path(path).resolve().is_relative_to(folder) for folder in _muted)


def _replace_atomically(path: Path, write) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it over ``path``: a reader sees the old file
    or the new one, never half of one. A write that fails (a full disk: ``OSError`` ENOSPC, or MLX's
    ``RuntimeError`` "Unable to write") raises ``WriteFailed`` naming ``path``, and ``path`` is left as it was."""
    path = Path(path)
    if _is_muted(path):
        return
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix or ".tmp")
        os.close(fd)
        write(Path(tmp))
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if getattr(error, "errno", None) != errno.ENOSPC and "Unable to write" not in str(error):
            raise
        raise WriteFailed(path, error, disk_full=True) from error
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def remove(path: Path) -> None:
    """Delete ``path`` if it exists (skipped under a muted folder, as writes are)."""
    if not _is_muted(path):
        Path(path).unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    _replace_atomically(path, lambda tmp: tmp.write_text(text))


def _finite_or_none(obj: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(_finite_or_none(data), indent=2, allow_nan=False) + "\n")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def save_array(path: Path, array) -> None:
    """A NumPy array as ``.npy``, atomically."""
    import numpy as np

    _replace_atomically(path, lambda tmp: np.save(tmp, array))


def write_csv(path: Path, frame) -> None:
    _replace_atomically(path, lambda tmp: frame.to_csv(tmp, index=False))


def save_figure(fig, path: Path, dpi: int = 120, **savefig_options) -> None:
    _replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png",
                                                      **savefig_options))


def save_tree(path: Path, tree: dict, metadata: dict[str, str] | None = None) -> None:
    """Save a parameter tree as safetensors, keyed by its flattened names ("weights.layers.0.bias")."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint files end in .safetensors, got {path}")
    _replace_atomically(path, lambda tmp: mx.save_safetensors(str(tmp), dict(utils.tree_flatten(tree)), metadata or {}))


def load_tree(path: Path) -> dict:
    return utils.tree_unflatten(list(mx.load(str(path)).items()))


def load_tree_with_metadata(path: Path) -> tuple[dict, dict[str, str]]:
    arrays, metadata = mx.load(str(path), return_metadata=True)
    return utils.tree_unflatten(list(arrays.items())), metadata
