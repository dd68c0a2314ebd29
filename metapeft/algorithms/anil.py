"""ANIL (Raghu et al., 2020): almost no inner loop. MAML whose inner loop adapts only the head.

    for each task T_i in the batch:   head_i = head - alpha * grad_head L_support(body, head)   (num_inner_steps)
    (body, head) <- (body, head) - beta * grad  mean_i L_query(body, head_i)                    (Adam)

The meta-gradient is second-order through the head's inner steps (``first_order`` drops it, as for FOMAML); the
body (with a PEFT method: the adapter) is meta-learned but never adapted per task.
"""
from __future__ import annotations

from dataclasses import dataclass

from metapeft.algorithms.base import AlgorithmConfig, sgd_step
from metapeft.algorithms.maml import MAML
from metapeft.backend import mx, utils
from metapeft.registry import ALGORITHMS


@dataclass
class ANILConfig(AlgorithmConfig):
    name: str = "anil"
    first_order: bool = False


@ALGORITHMS.register("anil", ANILConfig)
class ANIL(MAML):
    def inner_step(self, meta: dict, weights: dict, frozen: dict, x: mx.array, y: mx.array) -> dict:
        grads = mx.grad(lambda head: self.loss_fn({**weights, "head": head}, frozen, x, y))(weights["head"])
        if self.cfg.first_order:
            grads = utils.tree_map(mx.stop_gradient, grads)
        return {**weights, "head": sgd_step(weights["head"], grads, self.cfg.inner_lr)}
