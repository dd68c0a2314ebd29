"""N-way K-shot classification on scikit-learn's bundled 8x8 handwritten digits.

Every digit at every quarter-turn rotation is a class, as Omniglot's rotated characters are (Santoro et al., 2016).
Rotations that produce the same shape are one class, not two: 0, 1 and 8 turned by 180 degrees are themselves again,
and a 6 turned by 180 degrees is a 9. Their images are pooled, which leaves 30 classes (see ``canonical_class``).
Classes are split disjointly into meta-train / meta-validation / meta-test by a fixed split seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import mlx.core as mx
import numpy as np

from metapeft.config import require
from metapeft.registry import TASKS
from metapeft.tasks.base import Episodes, TaskConfig, TaskFamily

SPLITS = ("train", "val", "test")
SELF_SYMMETRIC_UNDER_HALF_TURN = {0, 1, 8}
HALF_TURN_PARTNER = {6: 9, 9: 6}


def canonical_class(digit: int, quarter_turns: int) -> tuple[int, int]:
    """The (digit, quarter_turns) class that this rotated digit is indistinguishable from."""
    if digit in SELF_SYMMETRIC_UNDER_HALF_TURN:
        return digit, quarter_turns % 2
    if digit in HALF_TURN_PARTNER and quarter_turns >= 2:
        return HALF_TURN_PARTNER[digit], quarter_turns - 2
    return digit, quarter_turns


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
    direction: str = "maximize"  # accuracy
    num_train_classes: int = 18
    num_val_classes: int = 5
    num_test_classes: int = 7
    split_seed: int = 0  # fixed, so every run of every algorithm sees the same class split


@TASKS.register("digits", DigitsConfig)
class Digits(TaskFamily):
    metric_name = "accuracy"
    higher_is_better = True
    input_shape = (8, 8)

    def __init__(self, cfg: DigitsConfig):
        classes = rotated_digit_classes()
        sizes = {"train": cfg.num_train_classes, "val": cfg.num_val_classes, "test": cfg.num_test_classes}
        for split, size in sizes.items():
            require(size >= 0, f"task.num_{split}_classes", f"must be >= 0, got {size}")
        require(sum(sizes.values()) <= len(classes), "task.num_train_classes",
                f"the three splits ask for {sum(sizes.values())} classes; digits has {len(classes)}")
        require(cfg.n_way >= 2, "task.n_way", f"must be >= 2, got {cfg.n_way}")
        for split, size in sizes.items():
            require(cfg.n_way <= size, "task.n_way",
                    f"{cfg.n_way}-way needs at least {cfg.n_way} classes, but the {split} split has {size} "
                    f"(task.num_{split}_classes); valid: 2..{min(sizes.values())}")
        require(cfg.num_query > 0, "task.num_query", f"must be > 0, got {cfg.num_query}")
        self.cfg = cfg
        self.output_dim = cfg.n_way
        keys = list(classes)
        order = np.random.default_rng(cfg.split_seed).permutation(len(keys))
        bounds = np.cumsum([0, *sizes.values()])
        self.class_names = {s: [keys[i] for i in order[lo:hi]] for s, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:])}
        self.class_images = {s: [classes[k] for k in names] for s, names in self.class_names.items()}
        train = self.class_images["train"]
        self.pretraining_outputs = len(train)
        self.pretraining_images = np.concatenate(train)
        self.pretraining_labels = np.concatenate([np.full(len(images), c, np.int32) for c, images in enumerate(train)])

    def validate(self, shots: Sequence[int]) -> None:
        smallest = min(len(images) for split in SPLITS for images in self.class_images[split])
        for k in shots:
            require(k + self.cfg.num_query <= smallest, "shots",
                    f"K={k} support + task.num_query={self.cfg.num_query} query examples per class exceed the "
                    f"{smallest} examples of the smallest class; valid: K + num_query <= {smallest}")

    def loss(self, prediction: mx.array, target: mx.array) -> mx.array:
        log_probs = prediction - mx.logsumexp(prediction, axis=-1, keepdims=True)
        return -mx.mean(mx.take_along_axis(log_probs, target[..., None], axis=-1))

    def metric(self, prediction: mx.array, target: mx.array) -> mx.array:
        return mx.mean(mx.argmax(prediction, axis=-1) == target)

    def sample(self, split: str, num_tasks: int, shots: int, rng: np.random.Generator) -> Episodes:
        pool = self.class_images[split]
        n, q = self.cfg.n_way, self.cfg.num_query
        x = np.empty((num_tasks, n, shots + q, *self.input_shape), dtype=np.float32)
        for t in range(num_tasks):
            for label, c in enumerate(rng.choice(len(pool), size=n, replace=False)):
                x[t, label] = pool[c][rng.choice(len(pool[c]), size=shots + q, replace=False)]
        labels = np.broadcast_to(np.arange(n, dtype=np.int32)[None, :, None], (num_tasks, n, shots + q))
        xs, xq = x[:, :, :shots], x[:, :, shots:]
        ys, yq = labels[:, :, :shots], labels[:, :, shots:]
        flat = lambda a: mx.array(np.ascontiguousarray(a).reshape(num_tasks, -1, *a.shape[3:]))
        return Episodes(flat(xs), flat(ys), flat(xq), flat(yq))

    def pretraining_batch(self, rng: np.random.Generator, batch_size: int) -> tuple[mx.array, mx.array]:
        """Supervised classification over all meta-train classes."""
        picks = rng.integers(0, len(self.pretraining_labels), size=batch_size)
        return mx.array(self.pretraining_images[picks]), mx.array(self.pretraining_labels[picks])
