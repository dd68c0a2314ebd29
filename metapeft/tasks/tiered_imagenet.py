"""tieredImageNet (Ren et al., 2018) from the folder layout its common copies have:

    ROOT/{train,val,test}/<wnid>/*.jpg          351 / 97 / 160 classes (34 ImageNet categories split 20 / 6 / 8)

Images are resized to ``task.image_size`` (84) once and cached (``metapeft.tasks.decoded``); only the classes of
the three splits are read. At 84x84 the whole benchmark is about 16 GB of uint8 in memory. Nothing is downloaded.

    python runners/run.py task=tiered_imagenet task.root=/data/tiered-imagenet model=resnet12 algorithm=protonet
"""
from __future__ import annotations

from dataclasses import dataclass

from metapeft.errors import ConfigError, require
from metapeft.registry import TASKS
from metapeft.tasks.class_folders import read_classes
from metapeft.tasks.classification import SPLITS
from metapeft.tasks.rgb import ColourImagesTask, DecodedImagesConfig, image_root


@dataclass
class TieredImageNetConfig(DecodedImagesConfig):
    name: str = "tiered_imagenet"


@TASKS.register("tiered_imagenet", TieredImageNetConfig)
class TieredImageNet(ColourImagesTask):
    def __init__(self, cfg: TieredImageNetConfig):
        root = image_root(cfg, "train/, val/ and test/")
        folders = {}
        for split in SPLITS:  # every split listed before any image is decoded
            if not (root / split).is_dir():
                raise ConfigError("task.root", f"{root / split} is missing; tieredImageNet's layout is "
                                  "ROOT/{train,val,test}/<wnid>/*.jpg")
            folders[split] = sorted(p for p in (root / split).iterdir() if p.is_dir())
            require(len(folders[split]) >= 2, "task.root", f"{root / split} holds {len(folders[split])} class "
                    "folder(s); a split needs at least 2")
        classes = {split: read_classes(root, folders[split], cfg.image_size, cfg.cache_dir, f"tiered_imagenet-{split}")
                   for split in SPLITS}
        names = {split: [f.name for f in folders[split]] for split in SPLITS}
        super().__init__(cfg, classes, names, size_keys={s: f"{s}/" for s in SPLITS})
