"""Sinusoid regression, the MAML protocol (Finn et al., 2017, section 5.1).

Each task is y = A sin(x - phase) with A ~ U[0.1, 5.0], phase ~ U[0, pi]; inputs x ~ U[-5, 5]; loss and metric MSE.
Splits differ only in their random streams: the task distribution is continuous.

``protocol=maml_paper`` follows MAML's reference code, which the Meta-SGD paper's Table 1 used: as many query
points as support points (K, not ``num_query``), the network initialized with truncated-normal weights of standard
deviation 0.01 (``model.init``) and Meta-SGD's learning rates drawn from U[0.005, 0.1] (``algorithm.init_lr_range``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metapeft.backend import mx
from metapeft.errors import require
from metapeft.protocols import Protocol
from metapeft.registry import TASKS
from metapeft.tasks.base import Episodes, TaskConfig, TaskFamily


@dataclass
class SinusoidConfig(TaskConfig):
    name: str = "sinusoid"
    num_query: int = 10  # query points per task; under protocol=maml_paper, K (as many as support)
    protocol: Protocol = Protocol.project
    default_inner_lr: float = 0.01
    default_meta_batch_size: int = 25
    amplitude_min: float = 0.1
    amplitude_max: float = 5.0
    phase_min: float = 0.0
    phase_max: float = float(np.pi)
    x_min: float = -5.0
    x_max: float = 5.0


@TASKS.register("sinusoid", SinusoidConfig)
class Sinusoid(TaskFamily):
    metric_name = "mse"
    higher_is_better = False
    input_shape = (1,)
    output_dim = 1

    pretraining_outputs = 32  # functions regressed at once, drawn from the meta-train distribution

    def __init__(self, cfg: SinusoidConfig):
        require(cfg.num_query > 0, "task.num_query", f"must be > 0, got {cfg.num_query}")
        require(0 <= cfg.amplitude_min <= cfg.amplitude_max, "task.amplitude_min",
                "need 0 <= amplitude_min <= amplitude_max")
        require(cfg.phase_min <= cfg.phase_max, "task.phase_min", "need phase_min <= phase_max")
        require(cfg.x_min < cfg.x_max, "task.x_min", "need x_min < x_max")
        self.cfg = cfg
        amplitude, phase = self.sample_functions(self.pretraining_outputs, np.random.default_rng(12345))
        self.pretraining_functions = amplitude[:, 0, 0], phase[:, 0, 0]

    def loss(self, prediction: mx.array, target: mx.array) -> mx.array:
        return mx.mean(mx.square(prediction - target))

    metric = loss

    def sample_functions(self, num_tasks: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        c = self.cfg
        return (rng.uniform(c.amplitude_min, c.amplitude_max, size=(num_tasks, 1, 1)),
                rng.uniform(c.phase_min, c.phase_max, size=(num_tasks, 1, 1)))

    def sample(self, split: str, num_tasks: int, shots: int, rng: np.random.Generator) -> Episodes:
        amplitude, phase = self.sample_functions(num_tasks, rng)
        num_query = shots if self.cfg.protocol == Protocol.maml_paper else self.cfg.num_query
        x = rng.uniform(self.cfg.x_min, self.cfg.x_max, size=(num_tasks, shots + num_query, 1))
        y = amplitude * np.sin(x - phase)
        x, y = mx.array(x, dtype=mx.float32), mx.array(y, dtype=mx.float32)
        return Episodes(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])

    def pretraining_batch(self, rng: np.random.Generator, batch_size: int) -> tuple[mx.array, mx.array]:
        """Inputs x and the values of a fixed set of meta-train sinusoids at x: a multi-output regression."""
        amplitude, phase = self.pretraining_functions
        x = rng.uniform(self.cfg.x_min, self.cfg.x_max, size=(batch_size, 1))
        return mx.array(x, dtype=mx.float32), mx.array(amplitude * np.sin(x - phase), dtype=mx.float32)
