"""CUB-200-2011 (Wah et al., 2011) as a few-shot benchmark: ``ROOT/CUB_200_2011/images/<id>.<name>/*.jpg`` (``ROOT``
may also be the ``CUB_200_2011`` folder), 200 bird species split 100 / 50 / 50 as Chen et al. (2019) split them
(shipped in ``metapeft/tasks/splits/cub.json``, its source named there), resized to ``task.image_size`` (84) once
and cached. Fine-grained: every class is a bird. Nothing is downloaded.

    python runners/run.py task=cub task.root=/data model=resnet12 algorithm=protonet
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from metapeft.errors import ConfigError
from metapeft.registry import TASKS
from metapeft.tasks.class_folders import read_classes
from metapeft.tasks.classification import SPLITS
from metapeft.tasks.rgb import ColourImagesTask, DecodedImagesConfig, image_root, published_split

FOLDER = "CUB_200_2011"


@dataclass
class CUBConfig(DecodedImagesConfig):
    name: str = "cub"


def class_id(folder: Path) -> int | None:
    prefix = folder.name.split(".", 1)[0]
    return int(prefix) if prefix.isdigit() else None


@TASKS.register("cub", CUBConfig)
class CUB(ColourImagesTask):
    def __init__(self, cfg: CUBConfig):
        root = image_root(cfg, f"{FOLDER}/")
        images = (root if root.name == FOLDER else root / FOLDER) / "images"
        if not images.is_dir():
            raise ConfigError("task.root", f"{images} is missing; CUB's layout is {FOLDER}/images/<id>.<name>/*.jpg")
        by_id = {class_id(p): p for p in images.iterdir() if p.is_dir() and class_id(p) is not None}
        split = published_split("cub")
        missing = sorted(set(split["train"] + split["val"] + split["test"]) - set(by_id))
        if missing:
            raise ConfigError("task.root", f"{images} lacks the class folders of ids {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''} ({len(missing)} of 200): not CUB-200-2011")
        folders = {s: [by_id[i] for i in split[s]] for s in SPLITS}
        classes = {s: read_classes(images, folders[s], cfg.image_size, cfg.cache_dir, f"cub-{s}") for s in SPLITS}
        super().__init__(cfg, classes, {s: [f.name for f in folders[s]] for s in SPLITS})
