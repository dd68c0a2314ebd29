"""metapeft.streams: work built on each stream is evaluated at once, by a thread of each stream, and a failure on a
worker's stream reaches the caller."""
from __future__ import annotations

import types

import pytest

from metapeft import streams as streams_module
from metapeft.backend import mx
from metapeft.streams import ParallelStreams


def test_each_stream_evaluates_what_was_built_on_it():
    parallel = ParallelStreams(3)
    assert len({str(s) for s in parallel.streams}) == 3
    x = mx.arange(6, dtype=mx.float32)
    mx.eval(x)
    outputs = []
    for i, stream in enumerate(parallel.streams):
        with mx.stream(stream):
            outputs.append(mx.exp(x * (i + 1)).sum())
    parallel.evaluate(outputs)
    for i, out in enumerate(outputs):
        assert out.item() == pytest.approx(float(mx.exp(x * (i + 1)).sum().item()), rel=1e-6)


def test_a_failure_on_a_worker_stream_is_raised_to_the_caller(monkeypatch):
    parallel = ParallelStreams(2)

    def failing_eval(outputs):
        if outputs == "broken":
            raise ValueError("the worker's evaluation failed")
        mx.eval(outputs)

    monkeypatch.setattr(streams_module, "mx", types.SimpleNamespace(eval=failing_eval))
    with pytest.raises(ValueError, match="worker's evaluation failed"):
        parallel.evaluate([mx.array(1.0), "broken"])
    parallel.evaluate([mx.array(1.0), mx.array(2.0)])  # the worker goes on after a failure


def test_parallel_passes_with_lora_dropout_are_refused_naming_the_key(compose_cfg):
    from metapeft.build import build
    from metapeft.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        build(compose_cfg("task=sinusoid", "peft=lora", "peft.dropout=0.1", "algorithm.parallel_passes=2"))
    assert error.value.key == "algorithm.parallel_passes" and "peft.dropout=0" in str(error.value)
    build(compose_cfg("task=sinusoid", "peft=lora", "algorithm.parallel_passes=2"))  # no dropout: accepted
