"""Shared by the colour-image benchmarks read from disk (``cifar_fs``, ``fc100``, ``mini_imagenet``): N-way K-shot
episodes over per-split lists of class images, kept as uint8 (miniImageNet's 60,000 84x84 images are 1.3 GB so,
5 GB as float32) and normalized as they are drawn.

Images are (height, width, 3), channels last, as ``model=conv4`` and ``model=resnet12`` read them. Normalization
is the standard per-channel one, ``(x / 255 - mean) / std``, with the mean and standard deviation of the meta-train
split's pixels (computed here, never from validation or test images; recorded as ``channel_mean`` /
``channel_std``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from metapeft.backend import mx
from metapeft.errors import require
from metapeft.tasks.base import Episodes, TaskClasses, TaskConfig
from metapeft.tasks.classification import SPLITS, ClassImagesTask

SPLITS_DIR = Path(__file__).parent / "splits"


def published_split(name: str) -> dict:
    """A benchmark's published class split, shipped with the package (``metapeft/tasks/splits/<name>.json``, its
    source named inside)."""
    return json.loads((SPLITS_DIR / f"{name}.json").read_text())


@dataclass
class ColourImagesConfig(TaskConfig):
    """What every colour-image benchmark shares: episodes and the folder or archive it is read from."""

    n_way: int = 5
    num_query: int = 15  # per class, the field's usual protocol
    root: Optional[str] = None
    default_inner_lr: float = 0.01  # MAML's miniImageNet inner learning rate
    default_meta_batch_size: int = 4


class ColourImagesTask(ClassImagesTask):
    """``class_images``: split -> one uint8 array (n, height, width, 3) per class; ``class_names`` the same
    shape, for messages (a class with too few images is named)."""

    def __init__(self, cfg, class_images: dict[str, list[np.ndarray]], class_names: dict[str, list[str]],
                 size_keys: dict[str, str] | None = None, class_sources: dict[str, list[int]] | None = None):
        for split in SPLITS:
            for images in class_images[split]:
                require(images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3, "task.root",
                        f"expected uint8 colour images (n, height, width, 3), got {images.dtype} {images.shape}")
        self.class_names = class_names
        super().__init__(cfg, class_images, class_images["train"][0].shape[1:], size_keys, class_sources)
        pixels = self.pretraining_images.reshape(-1, 3).astype(np.float64) / 255.0
        self.channel_mean = pixels.mean(axis=0).astype(np.float32)
        self.channel_std = np.maximum(pixels.std(axis=0), 1e-6).astype(np.float32)

    def normalized(self, images: np.ndarray) -> np.ndarray:
        return (images.astype(np.float32) / 255.0 - self.channel_mean) / self.channel_std

    def validate(self, shots) -> None:
        need = max(shots) + self.cfg.num_query
        for split in SPLITS:
            for name, images in zip(self.class_names[split], self.class_images[split]):
                require(len(images) >= need, "shots",
                        f"class {name} ({split} split) has {len(images)} images, fewer than K={max(shots)} support + "
                        f"task.num_query={self.cfg.num_query} query; valid: K + num_query <= {len(images)}")

    def sample_with_classes(self, split: str, num_tasks: int, shots: int,
                            rng: np.random.Generator) -> tuple[Episodes, TaskClasses]:
        episodes, drawn = super().sample_with_classes(split, num_tasks, shots, rng)
        as_float = lambda x: mx.array(self.normalized(np.asarray(x)))
        return Episodes(as_float(episodes.xs), episodes.ys, as_float(episodes.xq), episodes.yq), drawn

    def pretraining_batch(self, rng: np.random.Generator, batch_size: int) -> tuple[mx.array, mx.array]:
        picks = rng.integers(0, len(self.pretraining_labels), size=batch_size)
        return mx.array(self.normalized(self.pretraining_images[picks])), mx.array(self.pretraining_labels[picks])
