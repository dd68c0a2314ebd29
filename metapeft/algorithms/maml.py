"""MAML (Finn et al., 2017, Algorithm 2).

    for each task T_i in the batch:   phi_i = theta - alpha * grad L_support(theta)      (num_inner_steps times)
    theta <- theta - beta * grad_theta  sum_i L_query(phi_i)                              (Adam, as in the paper)

The meta-gradient is exact and second-order: it differentiates through every inner step, including the Hessian
terms. ``MetaLearner`` holds this structure; MAML only declares its config.
"""
from __future__ import annotations

from dataclasses import dataclass

from metapeft.algorithms.base import AlgorithmConfig, MetaLearner
from metapeft.registry import ALGORITHMS


@dataclass
class MAMLConfig(AlgorithmConfig):
    name: str = "maml"


@ALGORITHMS.register("maml", MAMLConfig)
class MAML(MetaLearner):
    first_order = False
