"""What a run's timings were taken on: the processor's name and the cores this process may use. Figures from two
processors do not compare (on an Intel Xeon, subnormal numbers made the encoder's step 20 to 30 times slower, a
cost another processor did not show: docs/performance.md), so runs and benchmarks record it."""
from __future__ import annotations

import contextlib
import os
import platform


def cpuinfo_field(name: str) -> str | None:
    """The first ``name: value`` line's value in /proc/cpuinfo (Linux), or None."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    return None


def describe() -> dict:
    """The processor's name, the architecture, and how many cores this process may run on."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"processor": cpuinfo_field("model name") or platform.processor() or "unknown",
            "architecture": platform.machine(), "cores": usable}
