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

Over several training runs (seeds), ``seeds_ci95`` adds the run-to-run variance: seeds and classes are crossed
random factors (every seed is tested on the same meta-test classes), and the variance of the grand mean is taken
as the sum of the two one-factor variances (Owen 2007, "The pigeonhole bootstrap"): the spread of the seed means
over S seeds, and the class jackknife over every task of every seed. The sum counts the episode noise twice, so it
errs wide; its degrees of freedom come from Welch-Satterthwaite. ``holm`` adjusts the p-values of a family of
such comparisons (Holm 1979).
"""
from __future__ import annotations

import math
from typing import NamedTuple

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
    variance, df, _ = task_variance(values, classes)
    return float(values.mean()), t_quantile_975(df) * math.sqrt(variance)


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


def leave_one_class_out_means(values: np.ndarray, holds: np.ndarray) -> np.ndarray:
    """For each class, the mean over the tasks that do not hold it."""
    kept = ~holds
    return (values @ kept) / kept.sum(axis=0)


def jackknife_variance(leave_one_out: np.ndarray) -> tuple[float, int]:
    """The variance from delete-one jackknife estimates, and its degrees of freedom (one fewer than units)."""
    units = leave_one_out.size
    return float((units - 1) / units * np.sum((leave_one_out - leave_one_out.mean()) ** 2)), units - 1


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
    variance, df = jackknife_variance(leave_one_class_out_means(first, held_first)
                                      - leave_one_class_out_means(second, held_second))
    return m1 - m2, t_quantile_975(df) * math.sqrt(variance)


class Interval(NamedTuple):
    mean: float
    ci95: float  # half-width of the two-sided 95% interval
    df: float  # degrees of freedom of its t quantile
    method: str
    num_seeds: int = 1


ONE_SEED = "one seed: test tasks only, not the training run's variance"
SEEDS = "over seeds: t interval of the seed means"
SEEDS_AND_CLASSES = "over seeds and classes: seed-mean variance + delete-one-class jackknife (Satterthwaite df)"


def task_variance(values: np.ndarray, classes: np.ndarray | None) -> tuple[float, float, str]:
    """The variance of the mean over tasks, its degrees of freedom, and the method (as ``mean_ci95``)."""
    if classes is not None:
        classes = np.asarray(classes)
        if classes.shape[0] != values.size:
            raise ValueError(f"{values.size} values but classes for {classes.shape[0]} tasks")
        holds = membership(classes)
        if jackknife_possible(holds):
            return (*jackknife_variance(leave_one_class_out_means(values, holds)), CLASS_JACKKNIFE)
    return float(values.var(ddof=1) / values.size), values.size - 1, ci95_method(classes)


def seeds_ci95(values_by_seed, classes_by_seed=None) -> Interval:
    """The mean over seeds of each seed's mean over its test tasks, with a 95% interval that includes the
    variance between training runs. ``values_by_seed``: one array of per-task values per seed (a paired
    difference works the same); ``classes_by_seed``: None (independent tasks) or one (tasks, classes) array per
    seed. With independent tasks the t interval of the seed means is complete (each seed mean carries its own
    tasks' noise); with shared classes the class jackknife over all tasks is added (module docstring). One seed:
    ``mean_ci95``'s interval, marked as covering test tasks only."""
    values = [np.asarray(v, dtype=np.float64) for v in values_by_seed]
    if not values or any(v.size < 2 for v in values):
        raise ValueError("every seed needs at least two test tasks")
    pooled = np.concatenate(values)
    classes = None if classes_by_seed is None else np.concatenate([np.asarray(c) for c in classes_by_seed])
    if len(values) == 1:
        variance, df, _ = task_variance(pooled, classes)
        return Interval(float(pooled.mean()), t_quantile_975(df) * math.sqrt(variance), df, ONE_SEED)
    seed_means = np.array([v.mean() for v in values])
    seed_variance, seed_df = float(seed_means.var(ddof=1) / seed_means.size), seed_means.size - 1
    mean = float(seed_means.mean())
    class_variance, class_df, method = task_variance(pooled, classes) if classes is not None else (0.0, 1, SEEDS)
    if method != CLASS_JACKKNIFE:  # independent tasks: the seed means already carry them
        return Interval(mean, t_quantile_975(seed_df) * math.sqrt(seed_variance), seed_df, SEEDS, len(values))
    variance = seed_variance + class_variance
    df = variance**2 / (seed_variance**2 / seed_df + class_variance**2 / class_df) if variance > 0 else seed_df
    return Interval(mean, t_quantile_975(df) * math.sqrt(variance), float(df), SEEDS_AND_CLASSES, len(values))


def p_value(interval: Interval) -> float:
    """Two-sided p-value of "the mean is 0" from a 95% interval and its degrees of freedom."""
    from scipy.special import stdtr

    if interval.ci95 <= 0:
        return 0.0 if interval.mean != 0 else 1.0
    t = abs(interval.mean) / (interval.ci95 / t_quantile_975(interval.df))
    return float(2 * stdtr(interval.df, -t))


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (Holm 1979): reject where the adjusted value is below
    the level; controls the family-wise error rate, never less powerful than Bonferroni."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p)
    m = p.size
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def mean_ci95_record(values, classes=None) -> dict[str, float]:
    """``mean_ci95`` as ``{"mean": ..., "ci95": ...}``, the shape the result files use."""
    return dict(zip(("mean", "ci95"), mean_ci95(values, classes)))
