"""Adapting a saved run to one's own few-shot task from Python, as the documentation shows."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from metapeft.api import load_run
from metapeft.experiment import run


def test_a_saved_run_adapts_to_a_new_task(compose_cfg, tmp_path):
    run(compose_cfg("algorithm=maml", "task=sinusoid", "mode.num_iterations=300", "mode.num_eval_tasks=10"),
        tmp_path / "run")
    learned = load_run(tmp_path / "run")
    rng = np.random.default_rng(7)
    x_support = rng.uniform(-5, 5, (10, 1)).astype(np.float32)
    x_query = np.linspace(-5, 5, 50, dtype=np.float32)[:, None]
    target = lambda x: 3.0 * np.sin(x - 1.0)
    before = float(np.mean((np.array(learned.predict(learned.meta["weights"], x_query)) - target(x_query)) ** 2))
    with pytest.warns(UserWarning, match="exceeds the 1 inner step"):  # trained with one step: adapting further
        weights = learned.adapt(x_support, target(x_support), num_steps=5)
    after = float(np.mean((np.array(learned.predict(weights, x_query)) - target(x_query)) ** 2))
    assert after < before
    assert mx.array_equal(learned.meta["weights"]["head"]["weight"],
                          load_run(tmp_path / "run" / "checkpoint").meta["weights"]["head"]["weight"]).item()


def test_bad_inputs_to_the_api_are_refused_saying_what_fits(compose_cfg, tmp_path):
    run(compose_cfg("task=digits", "mode=tiny"), tmp_path / "run")
    learned = load_run(tmp_path / "run")
    x = np.zeros((10, 8, 8), dtype=np.float32)
    labels = np.repeat(np.arange(5), 2)
    assert learned.predict(learned.adapt(x, labels), x).shape == (10, 5)
    for bad_x, bad_y, message in [(x[:, 0], labels, r"shape \(n, 8, 8\)"),
                                  (x, labels + 1, r"labels in 0\.\.4"),
                                  (x, labels.astype(np.float32), "integer labels"),
                                  (x, labels[:5], "10 integer labels")]:
        with pytest.raises(ValueError, match=message):
            learned.adapt(bad_x, bad_y)
    with pytest.raises(ValueError, match="num_steps"):
        learned.adapt(x, labels, num_steps=-1)
