"""Few-shot evaluation: adaptation curves over evaluation tasks, summarized as mean and 95% CI."""
from __future__ import annotations

from typing import Callable

import mlx.core as mx
import numpy as np

from metapeft.stats import mean_ci95
from metapeft.tasks.base import Episodes

StepFn = Callable[[dict, mx.array, mx.array], dict]  # (weights, x_support, y_support) -> weights
MetricFn = Callable[[dict, mx.array, mx.array], mx.array]  # (weights, x_query, y_query) -> scalar


def adaptation_curves(start: dict, step: StepFn, metric: MetricFn, episodes: Episodes, num_steps: int,
                      chunk_size: int) -> np.ndarray:
    """Query metric after 0, 1, ..., num_steps inner steps from ``start``: an array (tasks, num_steps + 1)."""

    def one_task(xs, ys, xq, yq):
        weights, scores = start, [metric(start, xq, yq)]
        for _ in range(num_steps):
            weights = step(weights, xs, ys)
            scores.append(metric(weights, xq, yq))
        return mx.stack(scores)

    per_task = mx.vmap(one_task)
    chunks = []
    for lo in range(0, len(episodes), chunk_size):
        curves = per_task(*(a[lo: lo + chunk_size] for a in episodes))
        mx.eval(curves)
        chunks.append(np.array(curves))
    return np.concatenate(chunks)


def summarize(curves: np.ndarray, report_step: int) -> dict:
    """The metric after ``report_step`` inner steps and the whole curve, each as mean and 95% CI over tasks."""
    final_mean, final_ci = mean_ci95(curves[:, report_step])
    per_step = [mean_ci95(curves[:, s]) for s in range(curves.shape[1])]
    return {
        "mean": final_mean,
        "ci95": final_ci,
        "num_tasks": int(curves.shape[0]),
        "inner_steps": report_step,
        "curve_mean": [m for m, _ in per_step],
        "curve_ci95": [c for _, c in per_step],
        "per_task": [float(v) for v in curves[:, report_step]],  # lets aggregation pool tasks over seeds exactly
    }
