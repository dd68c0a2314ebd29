"""Use a meta-trained run from Python: load its checkpoint, adapt it to your own few-shot task, predict.

    from metapeft.api import load_run
    learned = load_run("outputs/2026-11-25/12-00-00-000000")      # a run directory (or its checkpoint/)
    weights = learned.adapt(x_support, y_support)                   # the algorithm's own inner loop
    predictions = learned.predict(weights, x_query)

Inputs are arrays shaped like the task family's examples (sinusoid: (n, 1); digits: (n, 8, 8)), or lists of
strings for a text model (``model=hf_encoder``), with labels 0..n_way-1 for classification.
"""
from __future__ import annotations

import warnings
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
        if not (isinstance(steps, int) and steps >= 0):
            raise ValueError(f"num_steps: must be an integer >= 0, got {steps!r}")
        trained = self.experiment.cfg.algorithm.num_inner_steps
        if steps > max(trained, self.experiment.cfg.evaluation.num_inner_steps):
            warnings.warn(f"num_steps={steps} exceeds the {trained} inner step(s) this initialization was "
                          "meta-trained for; accuracy can fall sharply past it (its adaptation curve in "
                          "metrics.json shows how far)", stacklevel=2)
        x = self.inputs(x_support, "x_support")
        return self.experiment.learner.adapt(self.meta, self.frozen, x, self.targets(y_support, len(x)), steps)

    def predict(self, weights: dict, x) -> mx.array:
        return self.experiment.peft(weights, self.frozen, self.inputs(x, "x"))

    def inputs(self, x, name: str) -> mx.array:
        """``x`` as the model reads it (texts are tokenized for a text model), or a ValueError saying which shape
        the run's task expects."""
        exp = self.experiment
        if getattr(exp.model, "reads_tokens", False) and len(x) and all(isinstance(t, str) for t in x):
            length = exp.task.input_shape[0]
            ids = exp.model.tokenize(list(x))[:, :length]
            x = np.pad(ids, ((0, 0), (0, length - ids.shape[1])), constant_values=exp.model.pad_id)
        x, shape = np.asarray(x), tuple(exp.task.input_shape)
        if x.shape[1:] != shape or x.ndim != len(shape) + 1 or not np.issubdtype(x.dtype, np.number):
            raise ValueError(f"{name}: expected numbers of shape (n, {', '.join(map(str, shape))}) for "
                             f"task={self.experiment.cfg.task.name}, got {x.dtype} of shape {x.shape}")
        return mx.array(x.astype(np.float32))

    def targets(self, y, n: int) -> mx.array:
        """Labels 0..N-1 (classification) or targets of shape (n, outputs) (regression), checked."""
        task, y = self.experiment.task, np.asarray(y)
        if task.num_classes is not None:
            if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= task.num_classes:
                raise ValueError(f"y_support: expected {n} integer labels in 0..{task.num_classes - 1}, got {y.dtype} "
                                 f"of shape {y.shape}" + (f" with values {y.min()}..{y.max()}" if y.size else ""))
            return mx.array(y.astype(np.int32))
        if y.shape != (n, task.output_dim) or not np.issubdtype(y.dtype, np.number):
            raise ValueError(f"y_support: expected numbers of shape ({n}, {task.output_dim}), got {y.dtype} of shape "
                             f"{y.shape}")
        return mx.array(y.astype(np.float32))


def load_run(path: str | Path) -> LearnedInitialization:
    directory, cfg = saved_config(path)
    experiment = build(cfg)
    key = mx.random.key(0)
    backbone = experiment.model.init(key)  # only the shapes matter: the values come from the checkpoint
    inputs, _ = experiment.task.pretraining_batch(np.random.default_rng(0), 8)
    frozen = experiment.peft.frozen(backbone)
    expected_meta = experiment.learner.initial_meta(experiment.peft.init_adapted(backbone, key, inputs),
                                                    experiment.peft.learnable_backbone(frozen))
    meta, frozen = load_checkpoint(directory, expected_meta, frozen)
    # a meta-learned backbone (algorithm.meta_learn=backbone|both) is the one every task adapts
    return LearnedInitialization(experiment, meta, experiment.learner.task_frozen(meta, frozen))
