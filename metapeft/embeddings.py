"""Task embeddings and task similarity.

- ``fisher_embedding``: a Task2Vec-style embedding (Achille et al., 2019): the diagonal of the empirical Fisher
  information of the adapted parameters, i.e. the mean over the task's support examples of the squared per-example
  gradient of the loss, taken at the meta-learned model after it has adapted to the support set; L2-normalized.
- ``statistics_embedding``: a cheap one from the support set alone: mean and standard deviation of inputs and of
  labels (one-hot for classification), L2-normalized.
- ``similarity_matrix``: cosine similarity, or an RBF kernel of Euclidean distance (bandwidth: the median
  pairwise distance), between all pairs of embeddings; ``plot_similarity`` draws it as a heatmap.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from metapeft.backend import mx, utils
from metapeft.plots import save

MEASURES = ("cosine", "rbf")


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


def fisher_embedding(exp, meta: dict, frozen: dict, xs: mx.array, ys: mx.array,
                     num_steps: int | None = None) -> np.ndarray:
    """Diagonal empirical Fisher of the adapted parameters on one task's support set (xs, ys)."""
    weights = exp.learner.adapt(meta, frozen, xs, ys, num_steps)

    def squared_gradient(x, y):
        grads = mx.grad(exp.loss)(weights, frozen, x[None], y[None])
        return mx.concatenate([mx.square(g).reshape(-1) for _, g in utils.tree_flatten(grads)])

    fisher = mx.mean(mx.vmap(squared_gradient)(xs, ys), axis=0)
    return _unit(np.array(fisher, dtype=np.float64))


def statistics_embedding(xs: mx.array, ys: mx.array, num_classes: int | None = None) -> np.ndarray:
    x = np.array(xs, dtype=np.float64).reshape(len(xs), -1)
    y = np.array(ys, dtype=np.float64).reshape(len(ys), -1)
    if num_classes:
        y = np.eye(num_classes)[np.array(ys).astype(int).reshape(-1)]
    return _unit(np.concatenate([x.mean(0), x.std(0), y.mean(0), y.std(0)]))


def similarity_matrix(embeddings: Sequence[np.ndarray], measure: str = "cosine") -> np.ndarray:
    if measure not in MEASURES:
        raise ValueError(f"unknown similarity measure '{measure}'; valid: {list(MEASURES)}")
    e = np.stack(embeddings)
    if measure == "cosine":
        unit = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        return unit @ unit.T
    distances = np.linalg.norm(e[:, None] - e[None], axis=-1)
    off_diagonal = distances[~np.eye(len(e), dtype=bool)]
    bandwidth = np.median(off_diagonal) if off_diagonal.size and np.median(off_diagonal) > 0 else 1.0
    return np.exp(-((distances / bandwidth) ** 2))


def plot_similarity(matrix: np.ndarray, labels: Sequence[str], path: Path, title: str) -> Path:
    fig = Figure(figsize=(1.2 + 0.45 * len(labels), 1.0 + 0.4 * len(labels)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="viridis")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    fig.colorbar(image, ax=ax, label="similarity")
    ax.set_title(title, fontsize=9)
    return save(fig, Path(path))  # PNG and PDF
