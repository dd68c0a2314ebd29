"""The CIFAR-100 python archive as CIFAR-FS and FC100 read it: ``ROOT/cifar-100-python/{train,test,meta}``
(Krizhevsky's Python 2 pickles, as https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz unpacks; ``ROOT`` may
also be the ``cifar-100-python`` folder itself). Both few-shot benchmarks pool each class's 500 training and 100
test images (600 per class) and split the 100 classes, not the images, into meta-train / meta-validation /
meta-test. Nothing is downloaded.
"""
from __future__ import annotations

import pickle
from functools import lru_cache
from pathlib import Path

import numpy as np

from metapeft.errors import ConfigError

FOLDER = "cifar-100-python"


def archive_folder(root: str | Path) -> Path:
    root = Path(root).expanduser()
    folder = root if root.name == FOLDER else root / FOLDER
    if not folder.is_dir():
        raise ConfigError("task.root", f"{folder} is missing: give the folder holding {FOLDER}/ (train, test, meta), "
                          "the CIFAR-100 python archive unpacked")
    return folder


def unpickled(path: Path) -> dict:
    """One of the archive's Python 2 pickles, its keys as str (latin-1, as the archive's own page says to read it)."""
    if not path.is_file():
        raise ConfigError("task.root", f"{path} is missing; the CIFAR-100 python archive holds train, test and meta")
    try:
        with open(path, "rb") as file:
            data = pickle.load(file, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ConfigError("task.root", f"{path} is not a readable CIFAR-100 pickle ({error})") from error
    if not isinstance(data, dict):
        raise ConfigError("task.root", f"{path} holds a {type(data).__name__}, not the archive's dict")
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in data.items()}


def field(data: dict, key: str, path: Path):
    if key not in data:
        raise ConfigError("task.root", f"{path} has no '{key}' entry (it has {sorted(data)}): not the CIFAR-100 "
                          "python archive")
    return data[key]


@lru_cache(maxsize=2)
def read(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
    """(images uint8 (n, 32, 32, 3), fine labels, coarse labels, fine names, coarse names) over train and test."""
    meta_path = folder / "meta"
    meta = unpickled(meta_path)
    fine_names = [str(n) for n in field(meta, "fine_label_names", meta_path)]
    coarse_names = [str(n) for n in field(meta, "coarse_label_names", meta_path)]
    images, fine, coarse = [], [], []
    for part in ("train", "test"):
        path = folder / part
        data = unpickled(path)
        pixels = np.asarray(field(data, "data", path), dtype=np.uint8)
        if pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32:
            raise ConfigError("task.root", f"{path}'s 'data' has shape {pixels.shape}, not (n, 3072): not CIFAR-100")
        images.append(pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # stored channel-planar: to (32, 32, 3)
        fine.append(np.asarray(field(data, "fine_labels", path)))
        coarse.append(np.asarray(field(data, "coarse_labels", path)))
    return np.concatenate(images), np.concatenate(fine), np.concatenate(coarse), fine_names, coarse_names


def class_images(root: str | Path, split_classes: dict[str, list[str]], by: str) -> tuple[dict, dict, dict]:
    """(split -> images per class, split -> class names, split -> class sources) for the fine classes a split
    names (``by="fine"``) or every fine class of the superclasses it names (``by="coarse"``)."""
    folder = archive_folder(root)
    images, fine, coarse, fine_names, coarse_names = read(folder)
    known = fine_names if by == "fine" else coarse_names
    classes, names, sources = {}, {}, {}
    for split, wanted in split_classes.items():
        missing = sorted(set(wanted) - set(known))
        if missing:
            raise ConfigError("task.root", f"{folder / 'meta'} lacks the {by} classes {missing[:5]} of the published "
                              f"{split} split: not the CIFAR-100 archive")
        fine_ids = [fine_names.index(n) for n in wanted] if by == "fine" else \
            sorted({int(f) for f, c in zip(fine, coarse) if coarse_names[c] in wanted})
        classes[split] = [np.ascontiguousarray(images[fine == f]) for f in fine_ids]
        names[split] = [fine_names[f] for f in fine_ids]
        # FC100: classes of one superclass are related; CIFAR-FS: every class its own source
        sources[split] = ([wanted.index(coarse_names[int(coarse[fine == f][0])]) for f in fine_ids] if by == "coarse"
                          else list(range(len(fine_ids))))
    return classes, names, sources
