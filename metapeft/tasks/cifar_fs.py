"""CIFAR-FS (Bertinetto et al., 2019): N-way K-shot over CIFAR-100's 100 fine classes, 64 meta-train, 16
meta-validation and 20 meta-test, 600 32x32 colour images each, read from the CIFAR-100 python archive on disk
(``metapeft.tasks.cifar100``; the published class lists ship in ``metapeft/tasks/splits/cifar_fs.json``).

    python runners/run.py task=cifar_fs task.root=/data model=conv4 algorithm=protonet
"""
from __future__ import annotations

from dataclasses import dataclass

from metapeft.errors import require
from metapeft.registry import TASKS
from metapeft.tasks import cifar100
from metapeft.tasks.rgb import ColourImagesConfig, ColourImagesTask, published_split


@dataclass
class CifarFSConfig(ColourImagesConfig):
    name: str = "cifar_fs"


@TASKS.register("cifar_fs", CifarFSConfig)
class CifarFS(ColourImagesTask):
    split_name = "cifar_fs"
    classes_by = "fine"

    def __init__(self, cfg: CifarFSConfig):
        require(cfg.root is not None, "task.root", f"give the folder holding {cifar100.FOLDER}/: task.root=/data")
        split = published_split(self.split_name)
        classes, names, sources = cifar100.class_images(cfg.root, {s: split[s] for s in ("train", "val", "test")},
                                                        self.classes_by)
        super().__init__(cfg, classes, names, class_sources=sources)
