"""FC100 (Oreshkin et al., 2018): N-way K-shot over CIFAR-100 split by superclass, so that meta-test classes are
far from meta-train ones: 12 superclasses (60 classes) meta-train, 4 (20) meta-validation, 4 (20) meta-test, read
from the CIFAR-100 python archive on disk (``metapeft.tasks.cifar100``; the published superclass lists ship in
``metapeft/tasks/splits/fc100.json``). The classes of one superclass share a source in the confidence intervals.

    python runners/run.py task=fc100 task.root=/data model=conv4 algorithm=protonet
"""
from __future__ import annotations

from dataclasses import dataclass

from metapeft.registry import TASKS
from metapeft.tasks.cifar_fs import CifarFS
from metapeft.tasks.rgb import ColourImagesConfig


@dataclass
class FC100Config(ColourImagesConfig):
    name: str = "fc100"


@TASKS.register("fc100", FC100Config)
class FC100(CifarFS):
    split_name = "fc100"
    classes_by = "coarse"
