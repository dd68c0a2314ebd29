"""MLX's stream thread next to the main thread: the right thread, pinned and given back; never in parallel jobs."""
from __future__ import annotations

import os
import sys

import mlx.core as mx
import pytest

from metapeft import affinity

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread affinity via /proc and sched_*")


def cpu_ticks(thread: int) -> int:
    fields = open(f"/proc/self/task/{thread}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_the_recorded_thread_is_the_one_that_runs_mlx_work():
    assert len(affinity.mlx_threads()) == 1
    (thread,) = affinity.mlx_threads()
    before = cpu_ticks(thread)
    x = mx.random.normal((1000, 1000))
    for _ in range(40):  # elementwise work: MLX's own kernels, on its stream thread
        x = mx.tanh(x) * 1.01 + 0.01
        mx.eval(x)
    assert cpu_ticks(thread) - before >= 5  # >= 50 ms of CPU time (ticks of 10 ms)


def test_colocate_pins_the_main_and_stream_threads_to_one_core_and_release_gives_them_back():
    (thread,) = affinity.mlx_threads()
    main_before, stream_before = os.sched_getaffinity(0), os.sched_getaffinity(thread)
    with affinity.colocated() as placement:
        assert placement["colocated"], placement
        assert os.sched_getaffinity(0) == os.sched_getaffinity(thread) == {placement["core"]}
        assert mx.allclose(mx.ones((3, 3)) @ mx.ones((3, 3)), mx.full((3, 3), 3.0)).item()
    assert os.sched_getaffinity(0) == main_before and os.sched_getaffinity(thread) == stream_before
    assert affinity.status()["colocated"] is False


def test_colocation_can_be_switched_off_and_is_off_for_parallel_sweep_jobs(monkeypatch):
    monkeypatch.setenv("METAPEFT_COLOCATE", "off")
    before = os.sched_getaffinity(0)
    assert affinity.colocate() == {"colocated": False, "reason": "off"}
    monkeypatch.delenv("METAPEFT_COLOCATE")
    assert affinity.colocate(enabled=False) == {"colocated": False, "reason": "parallel sweep job"}
    assert os.sched_getaffinity(0) == before
