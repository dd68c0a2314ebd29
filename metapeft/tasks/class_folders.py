"""Benchmarks stored as one folder of images per class (tieredImageNet's and CUB's public layouts): the folders a
split needs are listed, checked and decoded once into the cache (``metapeft.tasks.decoded``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from metapeft.errors import ConfigError
from metapeft.tasks.decoded import decoded

EXTENSIONS = (".jpg", ".jpeg", ".png")


def image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in EXTENSIONS
                  and not f.name.startswith("."))


def read_classes(root: Path, folders: list[Path], size: int, cache_dir: str, name: str) -> list[np.ndarray]:
    """Each class folder's images, uint8 (n, size, size, 3); a folder without images is refused by name."""
    files = []
    for folder in folders:
        found = image_files(folder)
        if not found:
            raise ConfigError("task.root", f"{folder} holds no images ({', '.join(EXTENSIONS)})")
        files.append(found)
    images = decoded(root, [f for found in files for f in found], size, cache_dir, name)
    bounds = np.cumsum([0, *map(len, files)])
    return [images[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
