"""Meta-SGD (Li et al., 2017): MAML with a learning rate per parameter entry, meta-learned with theta.

    phi_i = theta - alpha (elementwise *) grad L_support(theta)
    (theta, alpha) <- (theta, alpha) - beta * grad_(theta, alpha)  sum_i L_query(phi_i)
"""
from __future__ import annotations

from dataclasses import dataclass

from metapeft.algorithms.base import AlgorithmConfig, sgd_step
from metapeft.algorithms.maml import MAML
from metapeft.backend import mx, utils
from metapeft.errors import require
from metapeft.registry import ALGORITHMS


@dataclass
class MetaSGDConfig(AlgorithmConfig):
    name: str = "metasgd"
    init_lr: float = "${.inner_lr}"  # type: ignore[assignment]  # alpha's initial value, every entry


@ALGORITHMS.register("metasgd", MetaSGDConfig)
class MetaSGD(MAML):
    def __init__(self, cfg: MetaSGDConfig, objective):
        super().__init__(cfg, objective)
        require(cfg.init_lr >= 0, "algorithm.init_lr", f"must be >= 0, got {cfg.init_lr}")

    def meta_parameters(self, weights: dict) -> dict:
        rates = utils.tree_map(lambda w: mx.full(w.shape, self.cfg.init_lr, dtype=w.dtype), weights)
        return {"weights": weights, "lr": rates}

    def inner_step(self, meta: dict, weights: dict, frozen: dict, x: mx.array, y: mx.array) -> dict:
        grads = mx.grad(self.loss_fn)(weights, frozen, x, y)
        return sgd_step(weights, grads, meta["lr"])
