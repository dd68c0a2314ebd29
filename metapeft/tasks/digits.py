"""N-way K-shot classification on scikit-learn's bundled 8x8 handwritten digits.

Every digit at every quarter-turn rotation is a class, as Omniglot's rotated characters are (Santoro et al., 2016).
Rotations that produce the same shape are one class, not two: 0, 1 and 8 turned by 180 degrees are themselves again,
and a 6 turned by 180 degrees is a 9. Their images are pooled, which leaves 30 classes (see ``canonical_class``).
Classes are split disjointly into meta-train / meta-validation / meta-test by a fixed split seed. ``digits`` keeps
only the classes of some digits (by canonical digit), e.g. to meta-train on 0-4 and test transfer to 5-9.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import List

import numpy as np

from metapeft.errors import require
from metapeft.registry import TASKS
from metapeft.tasks.base import TaskConfig
from metapeft.tasks.classification import SPLITS, ClassImagesTask

SELF_SYMMETRIC_UNDER_HALF_TURN = {0, 1, 8}
HALF_TURN_PARTNER = {6: 9, 9: 6}


def canonical_class(digit: int, quarter_turns: int) -> tuple[int, int]:
    """The (digit, quarter_turns) class that this rotated digit is indistinguishable from."""
    if digit in SELF_SYMMETRIC_UNDER_HALF_TURN:
        return digit, quarter_turns % 2
    if digit in HALF_TURN_PARTNER and quarter_turns >= 2:
        return HALF_TURN_PARTNER[digit], quarter_turns - 2
    return digit, quarter_turns


def source_digit(digit: int) -> int:
    """The images a class is made of: a 6 and a 9 share theirs (each is the other turned by 180 degrees)."""
    return min(digit, HALF_TURN_PARTNER.get(digit, digit))


@lru_cache(maxsize=1)
def rotated_digit_classes() -> dict[tuple[int, int], np.ndarray]:
    """All 30 classes: canonical (digit, quarter_turns) -> images (n, 8, 8) scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    pooled: dict[tuple[int, int], list[np.ndarray]] = {}
    for digit in range(10):
        for turns in range(4):
            rotated = np.rot90(images[data.target == digit], k=turns, axes=(1, 2))
            pooled.setdefault(canonical_class(digit, turns), []).append(rotated)
    return {key: np.ascontiguousarray(np.concatenate(parts)) for key, parts in sorted(pooled.items())}


@dataclass
class DigitsConfig(TaskConfig):
    name: str = "digits"
    n_way: int = 5
    num_query: int = 10
    default_inner_lr: float = 0.5
    default_meta_batch_size: int = 4
    num_train_classes: int = 18
    num_val_classes: int = 5
    num_test_classes: int = 7
    split_seed: int = 0  # fixed, so every run of every algorithm sees the same class split
    digits: List[int] = field(default_factory=lambda: list(range(10)))  # keep the classes of these digits


@TASKS.register("digits", DigitsConfig)
class Digits(ClassImagesTask):
    def __init__(self, cfg: DigitsConfig):
        require(len(cfg.digits) > 0 and set(cfg.digits) <= set(range(10)), "task.digits",
                f"must list digits from 0..9, got {list(cfg.digits)}")
        kept_digits = set(cfg.digits)
        classes = {key: images for key, images in rotated_digit_classes().items() if key[0] in kept_digits}
        sizes = {"train": cfg.num_train_classes, "val": cfg.num_val_classes, "test": cfg.num_test_classes}
        for split, size in sizes.items():
            require(size >= 0, f"task.num_{split}_classes", f"must be >= 0, got {size}")
        require(sum(sizes.values()) <= len(classes), "task.num_train_classes",
                f"the three splits ask for {sum(sizes.values())} classes; digits {list(cfg.digits)} have "
                f"{len(classes)}")
        keys = list(classes)
        order = np.random.default_rng(cfg.split_seed).permutation(len(keys))
        bounds = np.cumsum([0, *sizes.values()])
        self.class_names = {s: [keys[i] for i in order[lo:hi]] for s, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:])}
        names = self.class_names
        super().__init__(cfg, {s: [classes[k] for k in names[s]] for s in SPLITS}, (8, 8),
                         size_keys={s: f"task.num_{s}_classes" for s in SPLITS},
                         class_sources={s: [source_digit(digit) for digit, _ in names[s]] for s in SPLITS})
