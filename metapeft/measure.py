"""Costs a run records: memory, inference time, and where its time went."""
from __future__ import annotations

import os
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from metapeft.backend import mx


class PhaseTimes:
    """Seconds per phase of a run, summed over every time the phase runs (validation runs many times)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    def since_process_start(self) -> float | None:
        """Seconds since the process started: start-up (when the runner said) plus the time since these phases
        began; None for a later job of a sweep process, which has no start-up of its own."""
        start_up = self.seconds.get("start_up")
        return start_up + time.perf_counter() - self.started if start_up else None

    @contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def timed(self, name: str, function: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            with self.phase(name):
                return function(*args, **kwargs)

        return wrapper


def seconds_since_process_start() -> float | None:
    """How long this process has existed (Linux: /proc; 10 ms resolution); None where that cannot be read."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in clock ticks
    except (OSError, ValueError, IndexError):
        return None


def memory_mb() -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mlx_mb": mx.get_peak_memory() / 2**20,
            "max_rss_mb": rss / 2**20 if sys.platform == "darwin" else rss / 2**10}


def inference_ms_per_sample(forward: Callable, weights: dict, frozen: dict, x: mx.array, repeats: int = 20,
                            max_seconds: float = 2.0) -> float:
    """Median milliseconds per example of the compiled ``forward(weights, frozen, x)``, after warm-up: ``repeats``
    timings, or as many as fit in ``max_seconds`` (at least 3), so a large model's run does not spend its time here."""
    forward = mx.compile(forward)
    for _ in range(2):  # warm-up, including compilation
        mx.eval(forward(weights, frozen, x))
    times: list[float] = []
    while len(times) < repeats and (len(times) < 3 or sum(times) < max_seconds):
        start = time.perf_counter()
        mx.eval(forward(weights, frozen, x))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)) / x.shape[0]
