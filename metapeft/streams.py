"""CPU streams that run at once: MLX runs a stream's element-wise kernels on one thread, so independent work on
two streams can use two cores. One thread evaluating arrays of two streams did not overlap them here (``python -m
benchmarks encoder-streams``), so each extra stream is created by, and evaluated on, a thread of its own (MLX binds a
stream to the thread that made it). The graphs are built by the caller, under ``with mx.stream(stream)``."""
from __future__ import annotations

import queue
import threading

from metapeft.backend import mx


class ParallelStreams:
    """``streams``: the caller's default stream, then ``count - 1`` streams each owned by a worker thread.
    ``evaluate(outputs)`` evaluates ``outputs[i]`` (built on ``streams[i]``) all at once and returns when all are
    done, raising the first error any of them met."""

    def __init__(self, count: int):
        self.streams = [mx.default_stream(mx.default_device())]
        self._jobs: list[queue.Queue] = []
        self._done: queue.Queue = queue.Queue()
        for _ in range(count - 1):
            jobs, made = queue.Queue(), queue.Queue()
            threading.Thread(target=self._work, args=(jobs, made), daemon=True).start()
            self.streams.append(made.get())
            self._jobs.append(jobs)

    def _work(self, jobs: queue.Queue, made: queue.Queue) -> None:
        made.put(mx.new_stream(mx.default_device()))
        while True:
            outputs = jobs.get()
            try:
                mx.eval(outputs)
                self._done.put(None)
            except Exception as error:  # noqa: BLE001 - handed to the caller, which raises it
                self._done.put(error)

    def evaluate(self, outputs: list) -> None:
        for jobs, out in zip(self._jobs, outputs[1:]):
            jobs.put(out)
        errors = []
        try:
            mx.eval(outputs[0])
        except Exception as error:  # noqa: BLE001 - the workers are waited for before it is raised
            errors.append(error)
        errors += [e for e in (self._done.get() for _ in outputs[1:]) if e is not None]
        if errors:
            raise errors[0]
