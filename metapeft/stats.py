"""Means with 95% confidence intervals over evaluation tasks, honest about tasks that share classes.

Few-shot evaluation tasks are not independent draws when they are built from a small pool of classes: on digits,
600 5-way tasks drawn from 7 meta-test classes are 21 class sets resampled, and a task's accuracy depends on which
classes it holds. The Student-t interval over tasks then measures only the episode-to-episode noise and misses
the class-to-class variance, which is what separates one meta-test split from another. ``mean_ci95`` therefore
takes, next to each task's value, the classes the task was drawn from, and uses a delete-one-class jackknife
(the jackknife of a U-statistic; Arvesen 1969): each class in turn is removed with every task that holds it, and
the spread of the leave-one-class-out means gives the variance, with C - 1 degrees of freedom for C classes.

It is conservative, never too narrow: the class-level variance enters as it should, but the task-level noise enters
about N times (N classes per task) when classes rarely repeat, more when they always do. ``tests/test_stats.py``
measures both on simulated tasks. A cluster bootstrap over class *sets* is not used: with 5-way tasks over 7
classes the 21 sets share most of their classes, so it is nearly as narrow as the independent interval.
"""
from __future__ import annotations

import math

import numpy as np


def t_quantile_975(degrees_of_freedom: int) -> float:
    """The Student-t 97.5% quantile. scipy.special is imported here, at the first interval, not with this module:
    about 0.2 s of the runner's start-up otherwise (scipy.stats would take 3x as long)."""
    from scipy.special import stdtrit

    return float(stdtrit(degrees_of_freedom, 0.975))


TASKS_INDEPENDENT = "tasks independent (Student t)"
CLASS_JACKKNIFE = "delete-one-class jackknife"


def class_count(classes) -> int:
    return int(np.unique(np.asarray(classes)).size)


def class_set_count(classes) -> int:
    """How many distinct class sets the tasks were drawn from (the order of a task's classes does not matter)."""
    return int(np.unique(np.sort(np.asarray(classes), axis=1), axis=0).shape[0])


def mean_ci95(values, classes=None) -> tuple[float, float]:
    """Mean and half-width of a two-sided 95% confidence interval of the mean.

    ``classes``: None when tasks are independent draws (regression tasks with their own parameters); otherwise an
    integer array (tasks, classes per task) naming, for each task, the classes (or any shared source, such as a
    character whose rotations are separate classes) it was built from.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        raise ValueError(f"a confidence interval needs at least two values, got {values.size}")
    if classes is not None:
        half_width = class_jackknife_half_width(values, np.asarray(classes))
        if half_width is not None:
            return float(values.mean()), half_width
    half_width = t_quantile_975(values.size - 1) * values.std(ddof=1) / math.sqrt(values.size)
    return float(values.mean()), float(half_width)


def ci95_method(classes) -> str:
    """Which interval ``mean_ci95`` computes for tasks drawn from these classes."""
    if classes is None:
        return TASKS_INDEPENDENT
    holds = membership(np.asarray(classes))
    return CLASS_JACKKNIFE if jackknife_possible(holds) else TASKS_INDEPENDENT + ": a class is in every task"


def membership(classes: np.ndarray) -> np.ndarray:
    """(tasks, distinct classes) boolean: does task t hold class c."""
    if classes.ndim != 2:
        raise ValueError(f"classes must be (tasks, classes per task), got shape {classes.shape}")
    labels, index = np.unique(classes, return_inverse=True)
    holds = np.zeros((classes.shape[0], labels.size), dtype=bool)
    holds[np.arange(classes.shape[0])[:, None], index.reshape(classes.shape)] = True
    return holds


def jackknife_possible(holds: np.ndarray) -> bool:
    # Removing a class that every task holds leaves nothing: the tasks say nothing about other classes.
    return holds.shape[1] >= 2 and bool((~holds).any(axis=0).all())


def class_jackknife_half_width(values: np.ndarray, classes: np.ndarray) -> float | None:
    if classes.shape[0] != values.size:
        raise ValueError(f"{values.size} values but classes for {classes.shape[0]} tasks")
    holds = membership(classes)
    if not jackknife_possible(holds):
        return None
    return jackknife_half_width(leave_one_class_out_means(values, holds))


def leave_one_class_out_means(values: np.ndarray, holds: np.ndarray) -> np.ndarray:
    """For each class, the mean over the tasks that do not hold it."""
    kept = ~holds
    return (values @ kept) / kept.sum(axis=0)


def jackknife_half_width(leave_one_out: np.ndarray) -> float:
    """The 95% half-width from delete-one jackknife estimates, with one degree of freedom fewer than units."""
    units = leave_one_out.size
    variance = (units - 1) / units * np.sum((leave_one_out - leave_one_out.mean()) ** 2)
    return float(t_quantile_975(units - 1) * math.sqrt(variance))


def difference_ci95(first, first_classes, second, second_classes) -> tuple[float, float]:
    """mean(first) - mean(second) and the half-width of its 95% CI, for two sets of tasks (e.g. the same
    meta-test classes at two K). With classes, a delete-one-class jackknife of the difference: the class effects
    the two sets share cancel, as they do in the truth. Without (independent tasks), the two intervals combined."""
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    (m1, h1), (m2, h2) = mean_ci95(first), mean_ci95(second)
    if first_classes is None or second_classes is None:
        return m1 - m2, math.hypot(h1, h2)
    first_classes, second_classes = np.asarray(first_classes), np.asarray(second_classes)
    holds = membership(np.concatenate([first_classes, second_classes]))
    held_first, held_second = holds[: len(first)], holds[len(first):]
    if not (jackknife_possible(held_first) and jackknife_possible(held_second)):
        return m1 - m2, math.hypot(h1, h2)
    return m1 - m2, jackknife_half_width(leave_one_class_out_means(first, held_first)
                                         - leave_one_class_out_means(second, held_second))


def mean_ci95_record(values, classes=None) -> dict[str, float]:
    """``mean_ci95`` as ``{"mean": ..., "ci95": ...}``, the shape the result files use."""
    return dict(zip(("mean", "ci95"), mean_ci95(values, classes)))
