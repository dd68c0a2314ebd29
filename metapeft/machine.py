"""What a run's timings were taken on: the processor's name and its cores. Figures from two processors do not
compare (on an Intel Xeon, subnormal numbers made the encoder's FOMAML step take 237 s an iteration against 7.9 to
9.1 s without them, a cost another processor did not show: docs/performance.md), so runs and benchmarks record it."""
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
    """The processor's name, the architecture, and the machine's cores (not the calling thread's: a run pins its
    main thread to one, ``metapeft.affinity``)."""
    return {"processor": cpuinfo_field("model name") or platform.processor() or "unknown",
            "architecture": platform.machine(), "cores": os.cpu_count()}
