"""Meta-SGD (Li et al., 2017): MAML with a learning rate per parameter entry, meta-learned with theta.

    phi_i = theta - alpha (elementwise *) grad L_support(theta)
    (theta, alpha) <- (theta, alpha) - beta * grad_(theta, alpha)  sum_i L_query(phi_i)

alpha starts at ``init_lr`` everywhere, or, as in the paper, drawn uniformly from ``init_lr_range`` (the default
under ``task.protocol=maml_paper``: [0.005, 0.1]) with the run's seeded random state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from metapeft.algorithms.base import AlgorithmConfig, sgd_step
from metapeft.algorithms.maml import MAML
from metapeft.backend import mx, utils
from metapeft.errors import require
from metapeft.protocols import protocol_default
from metapeft.registry import ALGORITHMS


@dataclass
class MetaSGDConfig(AlgorithmConfig):
    name: str = "metasgd"
    init_lr: float = "${.inner_lr}"  # type: ignore[assignment]  # alpha's initial value, every entry
    init_lr_range: Optional[List[float]] = protocol_default("metasgd_init_lr_range")  # type: ignore[assignment]


@ALGORITHMS.register("metasgd", MetaSGDConfig)
class MetaSGD(MAML):
    def __init__(self, cfg: MetaSGDConfig, objective):
        super().__init__(cfg, objective)
        require(cfg.init_lr >= 0, "algorithm.init_lr", f"must be >= 0, got {cfg.init_lr}")
        if cfg.init_lr_range is not None:
            require(len(cfg.init_lr_range) == 2 and 0 <= cfg.init_lr_range[0] <= cfg.init_lr_range[1],
                    "algorithm.init_lr_range", f"must be [low, high] with 0 <= low <= high, got {cfg.init_lr_range}")

    def initial_rate(self, w: mx.array) -> mx.array:
        if self.cfg.init_lr_range is None:
            return mx.full(w.shape, self.cfg.init_lr, dtype=w.dtype)
        low, high = self.cfg.init_lr_range
        return mx.random.uniform(low, high, w.shape, dtype=w.dtype)

    def meta_parameters(self, weights: dict) -> dict:
        rates = utils.tree_map(self.initial_rate, weights)
        return {"weights": weights, "lr": rates}

    def inner_step(self, meta: dict, weights: dict, frozen: dict, x: mx.array, y: mx.array) -> dict:
        grads = mx.grad(self.loss_fn)(weights, frozen, x, y)
        return sgd_step(weights, grads, meta["lr"])
