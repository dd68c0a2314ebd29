"""Shared by the N-way K-shot classification families: episodes drawn from per-split lists of class images."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from metapeft.backend import mx
from metapeft.errors import require
from metapeft.tasks.base import Episodes, TaskClasses, TaskFamily

SPLITS = ("train", "val", "test")


class ClassImagesTask(TaskFamily):
    """Subclasses build ``class_images`` (split -> one array of images per class) and call ``__init__``."""

    metric_name = "accuracy"
    higher_is_better = True

    def __init__(self, cfg, class_images: dict[str, list[np.ndarray]], input_shape: tuple[int, ...],
                 size_keys: dict[str, str] | None = None, class_sources: dict[str, list[int]] | None = None):
        """``class_sources``: split -> for each class, what it was made from (a digit, a character): rotations of
        one character are separate classes but not independent ones. Default: every class is its own source."""
        require(cfg.n_way >= 2, "task.n_way", f"must be >= 2, got {cfg.n_way}")
        require(cfg.num_query > 0, "task.num_query", f"must be > 0, got {cfg.num_query}")
        sizes = {split: len(class_images[split]) for split in SPLITS}
        for split, size in sizes.items():
            where = f" ({size_keys[split]})" if size_keys else ""
            require(cfg.n_way <= size, "task.n_way", f"{cfg.n_way}-way needs at least {cfg.n_way} classes, but the "
                    f"{split} split has {size}{where}; valid: 2..{min(sizes.values())}")
        self.cfg = cfg
        self.class_images = class_images
        self.class_sources = {split: np.asarray(class_sources[split] if class_sources else range(len(images)))
                              for split, images in class_images.items()}
        self.input_shape = input_shape
        self.output_dim = self.num_classes = cfg.n_way
        train = class_images["train"]
        self.pretraining_outputs = len(train)
        self.pretraining_images = np.concatenate(train)
        self.pretraining_labels = np.concatenate([np.full(len(x), c, np.int32) for c, x in enumerate(train)])

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
        return self.sample_with_classes(split, num_tasks, shots, rng)[0]

    def sample_with_classes(self, split: str, num_tasks: int, shots: int,
                            rng: np.random.Generator) -> tuple[Episodes, TaskClasses]:
        pool = self.class_images[split]
        episodes, classes = self.episodes_of(pool, num_tasks, shots, rng,
                                             lambda t: rng.choice(len(pool), size=self.cfg.n_way, replace=False))
        return episodes, TaskClasses(classes, self.class_sources[split][classes])

    def episodes_of(self, pool: list[np.ndarray], num_tasks: int, shots: int, rng: np.random.Generator,
                    classes_of: Callable[[int], np.ndarray]) -> tuple[Episodes, np.ndarray]:
        """Episodes whose task t tells the classes ``classes_of(t)`` of ``pool`` apart (label i: its i-th class),
        ``shots`` support and ``task.num_query`` query examples of each drawn without replacement, and the
        (tasks, N) classes. A task's classes are chosen just before its examples, so ``rng`` is read in that order."""
        n, q = self.cfg.n_way, self.cfg.num_query
        x = np.empty((num_tasks, n, shots + q, *self.input_shape), dtype=pool[0].dtype)
        classes = np.empty((num_tasks, n), dtype=np.int64)
        for t in range(num_tasks):
            classes[t] = classes_of(t)
            for label, c in enumerate(classes[t]):
                x[t, label] = pool[c][rng.choice(len(pool[c]), size=shots + q, replace=False)]
        labels = np.broadcast_to(np.arange(n, dtype=np.int32)[None, :, None], (num_tasks, n, shots + q))

        def flat(a):  # (tasks, n_way, examples, ...) -> (tasks, n_way * examples, ...)
            return mx.array(np.ascontiguousarray(a).reshape(num_tasks, -1, *a.shape[3:]))

        episodes = Episodes(flat(x[:, :, :shots]), flat(labels[:, :, :shots]), flat(x[:, :, shots:]),
                            flat(labels[:, :, shots:]))
        return episodes, classes

    def pretraining_batch(self, rng: np.random.Generator, batch_size: int) -> tuple[mx.array, mx.array]:
        """Supervised classification over all meta-train classes."""
        picks = rng.integers(0, len(self.pretraining_labels), size=batch_size)
        return mx.array(self.pretraining_images[picks]), mx.array(self.pretraining_labels[picks])
