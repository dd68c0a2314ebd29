"""Reptile (Nichol et al., 2018, Algorithm 2, batched version).

    for each task T_i in the batch:   phi_i = SGD on L_support starting from theta        (num_inner_steps steps)
    theta <- theta + epsilon * mean_i (phi_i - theta)

written as SGD with learning rate epsilon on the pseudo-gradient theta - mean_i phi_i; epsilon is ``outer_lr`` and
is annealed linearly to ``outer_lr_final`` over meta-training, as in the paper. No gradient flows through the inner
loop. The reported meta-training loss is the query loss at phi_i, as for the other algorithms.
"""
from __future__ import annotations

from dataclasses import dataclass

from metapeft.algorithms.base import AlgorithmConfig, MetaLearner, map_tasks
from metapeft.backend import mx, optim, utils
from metapeft.errors import require
from metapeft.registry import ALGORITHMS
from metapeft.tasks.base import Episodes


@dataclass
class ReptileConfig(AlgorithmConfig):
    name: str = "reptile"
    num_inner_steps: int = 5
    outer_lr: float = 1.0  # epsilon, the outer step size
    anneal: bool = True  # anneal epsilon linearly from outer_lr to outer_lr_final
    outer_lr_final: float = 0.0


@ALGORITHMS.register("reptile", ReptileConfig)
class Reptile(MetaLearner):
    def __init__(self, cfg: ReptileConfig, objective):
        super().__init__(cfg, objective)
        require(cfg.meta_learn == "adapter", "algorithm.meta_learn", "Reptile moves the initialization toward the "
                "adapted parameters, and its inner loop never moves the backbone, so it has no update for it: use "
                f"meta_learn=adapter, or a gradient-based algorithm (maml, fomaml, metasgd, anil, protonet); got "
                f"{cfg.meta_learn}")
        require(0 <= cfg.outer_lr_final <= cfg.outer_lr, "algorithm.outer_lr_final",
                f"must be in [0, outer_lr={cfg.outer_lr}], got {cfg.outer_lr_final}")

    def meta_value_and_grad(self, meta: dict, frozen: dict, episodes: Episodes) -> tuple[mx.array, dict]:
        def one_task(xs, ys, xq, yq):
            phi = self.adapt(meta, frozen, xs, ys)
            return phi, self.loss_fn(phi, frozen, xq, yq)

        phis, losses = map_tasks(one_task, *episodes)
        pseudo_grad = utils.tree_map(lambda theta, phi: theta - mx.mean(phi, axis=0), meta["weights"], phis)
        return mx.mean(losses), {"weights": pseudo_grad}

    def make_optimizer(self, num_iterations: int) -> optim.Optimizer:
        c = self.cfg
        rate = optim.linear_schedule(c.outer_lr, c.outer_lr_final, num_iterations) if c.anneal else c.outer_lr
        return optim.SGD(learning_rate=rate)
