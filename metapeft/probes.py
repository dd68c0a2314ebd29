"""Few-shot read-outs of fixed features, shared by the baselines and by pretraining's early stopping: the nearest
class mean (classification) and a ridge head (regression), per task, on (tasks, examples, features) arrays."""
from __future__ import annotations

import numpy as np


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


def ridge_mse(xs, ys, xq, yq) -> np.ndarray:
    """MSE per task of a ridge regression (alpha=1, unpenalized intercept) fitted on the support set, over every
    output."""
    from sklearn.linear_model import Ridge

    ys, yq = flat(ys), flat(yq)
    # sklearn predicts a single output as a 1-D array: shaped back to the targets' (examples, outputs)
    return np.array([np.mean((Ridge(alpha=1.0).fit(xs[t], ys[t]).predict(xq[t]).reshape(yq[t].shape) - yq[t]) ** 2)
                     for t in range(len(xs))])
