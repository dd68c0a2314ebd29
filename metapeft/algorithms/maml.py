"""MAML (Finn et al., 2017, Algorithm 2).

    for each task T_i in the batch:   phi_i = theta - alpha * grad L_support(theta)      (num_inner_steps times)
    theta <- theta - beta * grad_theta  mean_i L_query(phi_i)                             (Adam, as in the paper)

The meta-gradient is exact and second-order: it differentiates through every inner step, including the Hessian
terms. ``first_order`` drops them (FOMAML, ``fomaml.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

from metapeft.algorithms.base import AlgorithmConfig, MetaLearner, map_tasks, sgd_step
from metapeft.backend import mx, utils
from metapeft.registry import ALGORITHMS
from metapeft.tasks.base import Episodes


@dataclass
class MAMLConfig(AlgorithmConfig):
    name: str = "maml"


@ALGORITHMS.register("maml", MAMLConfig)
class MAML(MetaLearner):
    first_order = False

    def inner_step(self, meta: dict, weights: dict, frozen: dict, x: mx.array, y: mx.array) -> dict:
        """phi <- phi - alpha * grad L_support(phi), differentiable unless ``first_order``."""
        grads = mx.grad(self.loss_fn)(weights, frozen, x, y)
        if self.first_order:
            grads = utils.tree_map(mx.stop_gradient, grads)
        return sgd_step(weights, grads, self.cfg.inner_lr)

    def query_loss(self, meta: dict, frozen: dict, xs, ys, xq, yq) -> mx.array:
        return self.loss_fn(self.adapt(meta, frozen, xs, ys), frozen, xq, yq)

    def meta_loss(self, meta: dict, frozen: dict, episodes: Episodes) -> mx.array:
        """Mean query loss after adaptation over the task batch (vectorized over tasks)."""
        frozen = self.task_frozen(meta, frozen)
        return mx.mean(map_tasks(lambda xs, ys, xq, yq: self.query_loss(meta, frozen, xs, ys, xq, yq), *episodes))

    def meta_value_and_grad(self, meta: dict, frozen: dict, episodes: Episodes) -> tuple[mx.array, dict]:
        return mx.value_and_grad(self.meta_loss)(meta, frozen, episodes)
