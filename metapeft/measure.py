"""Costs a run records: memory and inference time."""
from __future__ import annotations

import resource
import sys
import time
from typing import Callable

import numpy as np

from metapeft.backend import mx


def memory_mb() -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mlx_mb": mx.get_peak_memory() / 2**20,
            "max_rss_mb": rss / 2**20 if sys.platform == "darwin" else rss / 2**10}


def inference_ms_per_sample(forward: Callable, weights: dict, frozen: dict, x: mx.array, repeats: int = 20) -> float:
    """Median milliseconds per example of the compiled ``forward(weights, frozen, x)``, after warm-up."""
    forward = mx.compile(forward)
    for _ in range(3):  # warm-up, including compilation
        mx.eval(forward(weights, frozen, x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(forward(weights, frozen, x))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)) / x.shape[0]
