"""Prototypical networks (Snell et al., 2017): episodic training of an embedding f, classes as prototypes.

    c_k = mean of f(x) over the support examples of class k
    p(y = k | x) = softmax_k(-||f(x) - c_k||^2)
    f <- f - beta * grad_f  mean over the batch of the query cross-entropy                  (Adam, as in the paper)

No inner gradient step: the task-specific part is the prototype head (``base.prototype_head``), so ProtoNet is
MAML with ``head_init=prototypes`` and zero inner steps, and the meta-gradient flows through the prototypes into
the embedding. With a PEFT method, the adapter is what is meta-learned (the meta-learned head is never read).
Evaluation reports the metric after ``evaluation.num_inner_steps`` (default 0: pure ProtoNet); the adaptation curve
goes on with SGD steps from the prototype head at ``inner_lr`` (prototype initialization plus fine-tuning).
"""
from __future__ import annotations

from dataclasses import dataclass

from metapeft.algorithms.base import AlgorithmConfig, HeadInit
from metapeft.algorithms.maml import MAML
from metapeft.errors import require
from metapeft.registry import ALGORITHMS


@dataclass
class ProtoNetConfig(AlgorithmConfig):
    name: str = "protonet"
    num_inner_steps: int = 0
    head_init: HeadInit = HeadInit.prototypes


@ALGORITHMS.register("protonet", ProtoNetConfig)
class ProtoNet(MAML):
    min_inner_steps = 0

    def __init__(self, cfg: ProtoNetConfig, objective):
        require(cfg.head_init == HeadInit.prototypes, "algorithm.head_init",
                f"ProtoNet classifies by prototypes: must be prototypes, got {cfg.head_init}")
        super().__init__(cfg, objective)
