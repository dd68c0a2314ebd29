"""What every task family provides: episode sampling, a loss to adapt with and a metric to report."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
from omegaconf import MISSING

from metapeft.backend import mx


class Episodes(NamedTuple):
    """A batch of tasks. Leading axis: task. Support (xs, ys) is adapted on, query (xq, yq) is scored."""

    xs: mx.array
    ys: mx.array
    xq: mx.array
    yq: mx.array

    def __len__(self) -> int:  # number of tasks
        return self.xs.shape[0]


class FixedTaskEpisodes(NamedTuple):
    """Episodes of a family's fixed training tasks, with each one's index among them (``task``, integer, one per
    task): what an algorithm that keeps state per training task (LoRA-ML's adapters) trains on."""

    xs: mx.array
    ys: mx.array
    xq: mx.array
    yq: mx.array
    task: mx.array

    def __len__(self) -> int:
        return self.xs.shape[0]


def as_episodes(*arrays: mx.array) -> Episodes | FixedTaskEpisodes:
    """A batch from its arrays (as a compiled step receives them): with a fifth, the training tasks' indices."""
    return FixedTaskEpisodes(*arrays) if len(arrays) == 5 else Episodes(*arrays)


class TaskClasses(NamedTuple):
    """What each task of a batch was drawn from, (tasks, N) integer arrays: its classes (indices within the split)
    and their sources (a digit whose rotations are separate classes, a character): tasks sharing a source are not
    independent, and confidence intervals account for it (``metapeft.stats``)."""

    classes: np.ndarray
    sources: np.ndarray


@dataclass
class TaskConfig:
    name: str = MISSING
    num_query: int = MISSING  # query examples per class (classification) or per task (regression)
    default_inner_lr: float = MISSING  # the inner learning rate algorithms use unless overridden
    default_meta_batch_size: int = MISSING  # tasks per meta-iteration unless overridden


class TaskFamily:
    metric_name: str
    higher_is_better: bool
    input_shape: tuple[int, ...]  # one example, e.g. (1,) for sinusoid, (8, 8) for digits
    output_dim: int
    num_classes: int | None = None  # N of N-way classification (labels 0..N-1); None for regression

    def loss(self, prediction: mx.array, target: mx.array) -> mx.array:
        raise NotImplementedError

    def metric(self, prediction: mx.array, target: mx.array) -> mx.array:
        raise NotImplementedError

    def validate(self, shots: Sequence[int]) -> None:
        """Raise ConfigError if any of these K cannot be sampled from every split."""

    def sample(self, split: str, num_tasks: int, shots: int, rng: np.random.Generator) -> Episodes:
        raise NotImplementedError

    # A family whose meta-training draws from a fixed, finite set of tasks says how many (``task=low_rank``: T) and
    # samples them by index; None: every training task is a new draw.
    num_fixed_train_tasks: int | None = None

    def sample_fixed(self, tasks: np.ndarray, shots: int, rng: np.random.Generator) -> FixedTaskEpisodes:
        """Episodes of the fixed training tasks ``tasks`` (indices), K = ``shots`` support examples each."""
        raise NotImplementedError

    def sample_with_classes(self, split: str, num_tasks: int, shots: int,
                            rng: np.random.Generator) -> tuple[Episodes, TaskClasses | None]:
        """``sample`` and what each task was drawn from; None when tasks are independent draws (regression)."""
        return self.sample(split, num_tasks, shots, rng), None

    def raw_features(self, xs, xq) -> tuple[np.ndarray, np.ndarray]:
        """Support and query inputs as (tasks, examples, features) float64, for the baselines on raw input
        (nearest centroid, logistic regression): the flattened input unless a family says otherwise."""

        def flat(a):
            a = np.asarray(a, dtype=np.float64)
            return a.reshape(a.shape[0], a.shape[1], -1)

        return flat(xs), flat(xq)

    def report(self) -> dict:
        """Family-specific facts for ``metrics.json`` (``task=text_tasks``: its split of tasks)."""
        return {}

    # Pretraining of a backbone for the PEFT methods, on meta-train data only; ``loss`` is its objective.
    pretraining_outputs: int

    def pretraining_batch(self, rng: np.random.Generator, batch_size: int) -> tuple[mx.array, mx.array]:
        raise NotImplementedError
