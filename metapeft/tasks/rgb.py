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
from typing import List, Optional

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
    # the standard augmentation (RFS's): random crop after zero-padding by an eighth of the side, horizontal flip,
    # colour jitter of brightness, contrast and saturation by up to 40%; pretraining and meta-training only
    augment: bool = False
    # the per-channel normalization; null: the meta-train split's pixels' (a pretrained model's own, e.g. a ViT's
    # preprocessor_config.json image_mean / image_std, where its features are used)
    channel_mean: Optional[List[float]] = None
    channel_std: Optional[List[float]] = None


@dataclass
class DecodedImagesConfig(ColourImagesConfig):
    """A benchmark of image files (miniImageNet, tieredImageNet, CUB): resized once and cached."""

    image_size: int = 84
    cache_dir: str = "${oc.select:paths.cache_dir,'~/.cache/metapeft'}"  # the decoded images


def image_root(cfg: DecodedImagesConfig, layout: str) -> Path:
    """``task.root`` as a folder, and ``task.image_size`` checked, before any file is read; ``layout`` is what the
    folder should hold, for the message."""
    require(cfg.root is not None, "task.root", f"give the folder holding {layout}: task.root=/data/...")
    require(8 <= cfg.image_size <= 512, "task.image_size", f"must be in 8..512, got {cfg.image_size}")
    root = Path(cfg.root).expanduser()
    require(root.is_dir(), "task.root", f"{root} does not exist or is not a folder")
    return root


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
        self.channel_mean, self.channel_std = chosen_normalization(cfg, class_images["train"])

    def normalized(self, images: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """To float32, normalized; with ``rng``, augmented first (``task.augment``: training data only)."""
        pixels = images.astype(np.float32) / 255.0
        if rng is not None and self.cfg.augment:
            pixels = augmented(pixels, rng)
        return (pixels - self.channel_mean) / self.channel_std

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
        augment_with = rng if split == "train" else None  # never meta-validation or meta-test images
        as_float = lambda x: mx.array(self.normalized(np.asarray(x), augment_with))
        return Episodes(as_float(episodes.xs), episodes.ys, as_float(episodes.xq), episodes.yq), drawn

    def pretraining_batch(self, rng: np.random.Generator, batch_size: int) -> tuple[mx.array, mx.array]:
        picks = rng.integers(0, len(self.pretraining_labels), size=batch_size)
        return mx.array(self.normalized(self.pretraining_images[picks], rng)), mx.array(self.pretraining_labels[picks])


def chosen_normalization(cfg: ColourImagesConfig, train_classes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``task.channel_mean`` / ``task.channel_std`` where given (both or neither), else the meta-train pixels'."""
    given = {key: getattr(cfg, key) for key in ("channel_mean", "channel_std")}
    if all(value is None for value in given.values()):
        return channel_statistics(train_classes)
    for key, value in given.items():
        require(value is not None and len(value) == 3, f"task.{key}", "give three values (red, green, blue) for "
                f"both task.channel_mean and task.channel_std, or neither (the meta-train split's), got {value}")
    require(min(cfg.channel_std) > 0, "task.channel_std", f"must be > 0, got {list(cfg.channel_std)}")
    return np.asarray(cfg.channel_mean, np.float32), np.asarray(cfg.channel_std, np.float32)


def channel_statistics(classes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of the pixels in [0, 1], summed class by class (miniImageNet's
    meta-train pixels as one float64 array would take 6.5 GB)."""
    count, total, squares = 0, np.zeros(3), np.zeros(3)
    for images in classes:
        pixels = images.reshape(-1, 3).astype(np.float64) / 255.0
        count, total, squares = count + len(pixels), total + pixels.sum(axis=0), squares + np.square(pixels).sum(axis=0)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - np.square(mean), 0))
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def augmented(pixels: np.ndarray, rng: np.random.Generator, jitter: float = 0.4) -> np.ndarray:
    """Images (..., height, width, 3) in [0, 1], each randomly cropped from a zero-padded copy (an eighth of the
    side each way: 4 pixels of CIFAR's 32), flipped left-right with probability 1/2, and its brightness, contrast
    and saturation scaled by factors from U[1 - jitter, 1 + jitter] (torchvision's ColorJitter, in that order)."""
    shape = pixels.shape
    flat = pixels.reshape(-1, *shape[-3:])
    n, height, width, _ = flat.shape
    pad = max(1, height // 8)
    padded = np.pad(flat, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy, dx = rng.integers(0, 2 * pad + 1, size=(2, n))
    rows = dy[:, None] + np.arange(height)[None, :]
    cols = dx[:, None] + np.arange(width)[None, :]
    out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    flip = rng.random(n) < 0.5
    out[flip] = out[flip, :, ::-1]
    factor = lambda: rng.uniform(1 - jitter, 1 + jitter, size=(n, 1, 1, 1)).astype(np.float32)
    gray = lambda x: (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    out = np.clip(out * factor(), 0, 1)  # brightness
    mean = gray(out).mean(axis=(1, 2), keepdims=True)
    out = np.clip((out - mean) * factor() + mean, 0, 1)  # contrast
    out = np.clip((out - gray(out)) * factor() + gray(out), 0, 1)  # saturation
    return out.reshape(shape).astype(np.float32)
