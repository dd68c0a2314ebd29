"""Use a meta-trained run from Python: load its checkpoint, adapt it to your own few-shot task, predict.

    from metapeft.api import load_run
    learned = load_run("outputs/2026-11-25/12-00-00-000000")      # a run directory (or its checkpoint/)
    weights = learned.adapt(x_support, y_support)                   # the algorithm's own inner loop
    predictions = learned.predict(weights, x_query)

Inputs are arrays shaped like the task family's examples (sinusoid: (n, 1); digits: (n, 8, 8)) with labels
0..n_way-1 for classification.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metapeft.backend import mx
from metapeft.build import Experiment, build
from metapeft.checkpoint import load_checkpoint, saved_config


@dataclass
class LearnedInitialization:
    experiment: Experiment
    meta: dict
    frozen: dict

    def adapt(self, x_support, y_support, num_steps: int | None = None) -> dict:
        """Adapted weights after ``num_steps`` inner steps (default: the run's evaluation budget)."""
        steps = self.experiment.cfg.evaluation.num_inner_steps if num_steps is None else num_steps
        return self.experiment.learner.adapt(self.meta, self.frozen, mx.array(x_support), mx.array(y_support), steps)

    def predict(self, weights: dict, x) -> mx.array:
        return self.experiment.peft(weights, self.frozen, mx.array(x))


def load_run(path: str | Path) -> LearnedInitialization:
    directory, cfg = saved_config(path)
    experiment = build(cfg)
    key = mx.random.key(0)
    backbone = experiment.model.init(key)  # only the shapes matter: the values come from the checkpoint
    inputs, _ = experiment.task.pretraining_batch(np.random.default_rng(0), 8)
    expected_meta = experiment.learner.meta_parameters(experiment.peft.init_adapted(backbone, key, inputs))
    meta, frozen = load_checkpoint(directory, expected_meta, experiment.peft.frozen(backbone))
    return LearnedInitialization(experiment, meta, frozen)
