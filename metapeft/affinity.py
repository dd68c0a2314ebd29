"""Keep MLX's CPU stream thread on the same core as the Python thread that feeds it.

MLX evaluates every primitive on a worker thread per stream: the main thread builds the graph and hands each
primitive over with a condition-variable signal. A meta-step of the sinusoid MLP is ~200 tiny primitives, so the
hand-over dominates: with the two threads free to run on different cores, every signal wakes a sleeping thread on
the other core (a system call and a cross-core wake-up, ``pthread_cond_signal`` was a quarter of all samples in a
profile). On one core the woken worker simply runs when the main thread waits for the result. Measured with
``python -m benchmarks steps`` against ``METAPEFT_COLOCATE=off python -m benchmarks steps``: see docs/performance.md.

Only the main thread and MLX's stream thread are pinned; BLAS threads keep every core, so large matrix products
still run in parallel. ``METAPEFT_COLOCATE=off`` (or ``colocate(False)``) leaves the threads alone. Parallel sweep
jobs do not pin (two jobs could pick the same core); the runner decides that (``runners/run.py``).
"""
from __future__ import annotations

import ctypes
import os
import sys
from contextlib import contextmanager
from typing import Iterator

_mlx_threads: set[int] = set()
_status: dict = {"colocated": False, "reason": "not requested"}
_saved: dict[int, set[int]] = {}  # thread id -> its cores before colocate()


def _thread_ids() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def record_mlx_threads(mx) -> None:
    """Start MLX's CPU stream thread and remember its id (``metapeft.backend.load`` calls this, once, with
    ``mlx.core`` just imported and before MLX has run anything)."""
    global _mlx_threads
    if not sys.platform.startswith("linux"):
        return
    try:
        before = _thread_ids()
        mx.eval(mx.add(mx.array(1.0, dtype=mx.float32), 1.0, stream=mx.cpu))  # the CPU stream's thread starts here
        _mlx_threads = _thread_ids() - before
    except OSError:  # no /proc: colocate() will say the thread was not identified
        _mlx_threads = set()


def mlx_threads() -> set[int]:
    """The ids of MLX's stream threads, as recorded when MLX was loaded (empty if not identified)."""
    return set(_mlx_threads)


def status() -> dict:
    return dict(_status)


def colocate(enabled: bool = True, reason: str = "parallel sweep job") -> dict:
    """Pin the calling (main) thread and MLX's CPU stream thread to the core the calling thread runs on now.
    Needs MLX loaded (``metapeft.backend.load()``), which identifies the stream thread."""
    global _status
    if not enabled or os.environ.get("METAPEFT_COLOCATE", "auto") == "off":
        _status = {"colocated": False, "reason": "off" if enabled else reason}
        return status()
    if not _mlx_threads:
        _status = {"colocated": False, "reason": f"MLX's stream thread not identified on {sys.platform} (was MLX "
                                                 "loaded through metapeft.backend before it ran anything?)"}
        return status()
    try:
        core = ctypes.CDLL(None).sched_getcpu()
        for thread in {0, *(_mlx_threads & _thread_ids())}:  # 0: the calling thread
            _saved.setdefault(thread, os.sched_getaffinity(thread))
            os.sched_setaffinity(thread, {core})
        _status = {"colocated": True, "core": core, "threads": len(_mlx_threads) + 1}
    except OSError as error:  # a container that forbids the core, ...: run unpinned and say why
        release()
        _status = {"colocated": False, "reason": f"{type(error).__name__}: {error}"}
    return status()


def release() -> None:
    """Give the pinned threads back the cores they had. Threads started while pinned keep the one core."""
    global _status
    for thread, cores in _saved.items():
        try:
            os.sched_setaffinity(thread, cores)
        except OSError:  # the thread has ended
            pass
    _saved.clear()
    _status = {"colocated": False, "reason": "released"}


@contextmanager
def colocated() -> Iterator[dict]:
    """Colocate for the duration of a block (the benchmark: its peers' thread pools must not inherit one core)."""
    try:
        yield colocate()
    finally:
        release()
