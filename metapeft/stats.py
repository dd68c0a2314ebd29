"""Means with 95% confidence intervals over evaluation tasks."""
from __future__ import annotations

import math

import numpy as np
from scipy.special import stdtrit  # the Student-t quantile; scipy.stats takes 3x as long to import


def mean_ci95(values) -> tuple[float, float]:
    """Mean and half-width of the two-sided 95% Student-t confidence interval of the mean."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        raise ValueError(f"a confidence interval needs at least two values, got {values.size}")
    half_width = stdtrit(values.size - 1, 0.975) * values.std(ddof=1) / math.sqrt(values.size)
    return float(values.mean()), float(half_width)


def mean_ci95_record(values) -> dict[str, float]:
    """``mean_ci95`` as ``{"mean": ..., "ci95": ...}``, the shape the result files use."""
    return dict(zip(("mean", "ci95"), mean_ci95(values)))
