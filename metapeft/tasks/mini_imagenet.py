"""miniImageNet (Vinyals et al., 2016) in Ravi & Larochelle's split, read from the layout its public copies have:

    ROOT/images/*.jpg                         every image, named as the CSV files name it
    ROOT/{train,val,test}.csv                 filename,label (a header line, then one image a line)

64 meta-train, 16 meta-validation and 20 meta-test classes (WordNet ids as labels), 600 images each, resized to
``task.image_size`` (84) once and cached (``metapeft.tasks.decoded``). Nothing is downloaded.

    python runners/run.py task=mini_imagenet task.root=/data/mini-imagenet model=resnet12 algorithm=protonet
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metapeft.errors import ConfigError, require
from metapeft.registry import TASKS
from metapeft.tasks.classification import SPLITS
from metapeft.tasks.decoded import decoded
from metapeft.tasks.rgb import ColourImagesTask, DecodedImagesConfig, image_root


@dataclass
class MiniImageNetConfig(DecodedImagesConfig):
    name: str = "mini_imagenet"


def read_split_csv(path: Path) -> dict[str, list[str]]:
    """label -> its image file names, in the CSV's order."""
    if not path.is_file():
        raise ConfigError("task.root", f"{path} is missing; miniImageNet's layout is ROOT/images/*.jpg and "
                          "ROOT/{train,val,test}.csv (filename,label)")
    with open(path, newline="") as file:
        rows = list(csv.reader(file))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise ConfigError("task.root", f"{path} must start with the header 'filename,label', got {rows[:1]}")
    classes: dict[str, list[str]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not all(cell.strip() for cell in row):
            raise ConfigError("task.root", f"{path}, line {line}: expected 'filename,label', got {row}")
        classes.setdefault(row[1].strip(), []).append(row[0].strip())
    require(len(classes) >= 2, "task.root", f"{path} names {len(classes)} class(es); a split needs at least 2")
    return classes


@TASKS.register("mini_imagenet", MiniImageNetConfig)
class MiniImageNet(ColourImagesTask):
    def __init__(self, cfg: MiniImageNetConfig):
        root = image_root(cfg, "images/ and train.csv, val.csv, test.csv")
        splits = {split: read_split_csv(root / f"{split}.csv") for split in SPLITS}  # every CSV checked first
        files = {split: [root / "images" / name for names in classes.values() for name in names]
                 for split, classes in splits.items()}
        for split in SPLITS:
            absent = [f for f in files[split] if not f.is_file()]
            if absent:
                raise ConfigError("task.root", f"{len(absent)} image(s) that {split}.csv names are missing, e.g. "
                                  f"{absent[0]}")
        classes, names = {}, {}
        for split, by_label in splits.items():
            images = decoded(root, files[split], cfg.image_size, cfg.cache_dir, f"mini_imagenet-{split}")
            bounds = np.cumsum([0, *(len(v) for v in by_label.values())])
            classes[split] = [images[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
            names[split] = list(by_label)
        super().__init__(cfg, classes, names, size_keys={s: f"{s}.csv" for s in SPLITS})
