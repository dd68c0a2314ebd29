"""Few-shot read-outs of fixed features, shared by the baselines and by pretraining's early stopping: the nearest
class mean, logistic regression (classification) and a ridge head (regression), per task, on (tasks, examples,
features) arrays; and the choice of a read-out's regularisation on meta-validation tasks (``tuned``)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List

import numpy as np


@dataclass
class ProbeConfig:
    """The grids the linear read-outs' regularisation is chosen from, on meta-validation tasks of the same K
    (``tuned``): logistic regression's inverse strength C (linear_probe, logistic_regression) and ridge's alpha
    (linear_probe on regression tasks)."""

    logistic_c: List[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0])
    ridge_alpha: List[float] = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0, 100.0])


def flat(a) -> np.ndarray:
    """(tasks, examples, ...) -> (tasks, examples, features) in float64."""
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(a.shape[0], a.shape[1], -1)


def nearest_centroid(xs, ys, xq, yq, num_classes: int) -> np.ndarray:
    """Accuracy per task of assigning each query to the nearest class mean of the support set."""
    one_hot = np.asarray(ys)[..., None] == np.arange(num_classes)  # (tasks, support, classes)
    centroids = np.einsum("tsc,tsd->tcd", one_hot, xs) / one_hot.sum(axis=1)[..., None]
    distances = ((xq[:, :, None, :] - centroids[:, None, :, :]) ** 2).sum(axis=-1)
    return (distances.argmin(axis=-1) == np.asarray(yq)).mean(axis=1)


def ridge_mse(xs, ys, xq, yq, alpha: float = 1.0) -> np.ndarray:
    """MSE per task of a ridge regression (unpenalized intercept) fitted on the support set, over every output."""
    from sklearn.linear_model import Ridge

    ys, yq = flat(ys), flat(yq)
    # sklearn predicts a single output as a 1-D array: shaped back to the targets' (examples, outputs)
    return np.array([np.mean((Ridge(alpha=alpha).fit(xs[t], ys[t]).predict(xq[t]).reshape(yq[t].shape) - yq[t]) ** 2)
                     for t in range(len(xs))])


def logistic_regression(xs, ys, xq, yq, c: float = 1.0) -> np.ndarray:
    """Accuracy per task of scikit-learn's L2 logistic regression (inverse strength ``c``) fitted on the support
    set."""
    from sklearn.linear_model import LogisticRegression  # 1 s to import: only when a baseline needs it

    ys, yq = np.asarray(ys), np.asarray(yq)
    return np.array([LogisticRegression(C=c, max_iter=1000).fit(xs[t], ys[t]).score(xq[t], yq[t])
                     for t in range(len(xs))])


def tuned(score: Callable[..., np.ndarray], grid: list[float], validation: tuple, test: tuple,
          higher_is_better: bool, name: str) -> tuple[np.ndarray, dict]:
    """Per-task test scores of a read-out at the grid value with the best mean validation score, and that choice.
    ``score(value, xs, ys, xq, yq)`` gives per-task scores; ``validation`` and ``test`` are its (xs, ys, xq, yq).
    Ties go to the value nearest 1 (the libraries' default), so a grid validation cannot tell apart changes
    nothing."""
    means = {value: float(np.mean(score(value, *validation))) for value in grid}
    worst = -math.inf if higher_is_better else math.inf  # a value that failed (NaN) is never chosen
    usable = lambda value: means[value] if math.isfinite(means[value]) else worst
    pick = max if higher_is_better else min
    best = pick(grid, key=lambda v: (usable(v), -abs(math.log(v)) if higher_is_better else abs(math.log(v))))
    return score(best, *test), {"chosen_on_validation": {
        name: best, "val_metric": means[best], "at_grid_edge": len(grid) > 1 and best in (min(grid), max(grid)),
        "val_grid": {f"{v:g}": m for v, m in means.items()}, "num_val_tasks": len(validation[0])}}
