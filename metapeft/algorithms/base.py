"""The vocabulary every meta-learning algorithm shares, and the plain gradient step they adapt with.

    meta_parameters(weights)                 what the outer loop learns, starting from an adapted tree
    inner_step(meta, weights, frozen, x, y)  one task-specific update on a support set
    adapt(meta, frozen, x, y)                num_inner_steps inner steps from the meta-learned initialization
    meta_value_and_grad(meta, frozen, eps)   the outer objective and its gradient over a batch of tasks
    make_optimizer(num_iterations)           the outer update rule

An algorithm never knows which task or PEFT method it runs on: it sees the adapted tree, the frozen tree and
``loss_fn(adapted, frozen, x, y)``. One file per algorithm (``maml.py``, ...) fills in what is its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mlx.utils import tree_map
from omegaconf import MISSING

from metapeft.backend import mx, optim
from metapeft.errors import require
from metapeft.tasks.base import Episodes

LossFn = Callable[[dict, dict, "mx.array", "mx.array"], "mx.array"]  # (adapted, frozen, x, y) -> loss


@dataclass
class AlgorithmConfig:
    name: str = MISSING
    inner_lr: float = "${task.default_inner_lr}"  # type: ignore[assignment]
    num_inner_steps: int = 1
    outer_lr: float = 0.001  # Adam's learning rate
    meta_batch_size: int = "${task.default_meta_batch_size}"  # type: ignore[assignment]


def sgd_step(weights: dict, grads: dict, lr) -> dict:
    """weights - lr * grads; ``lr`` is a scalar or a tree shaped like ``weights`` (Meta-SGD)."""
    if isinstance(lr, dict):
        return tree_map(lambda w, g, a: w - a * g, weights, grads, lr)
    return tree_map(lambda w, g: w - lr * g, weights, grads)


class MetaLearner:
    def __init__(self, cfg: AlgorithmConfig, loss_fn: LossFn):
        require(cfg.inner_lr >= 0, "algorithm.inner_lr", f"must be >= 0, got {cfg.inner_lr}")
        require(cfg.num_inner_steps >= 1, "algorithm.num_inner_steps", f"must be >= 1, got {cfg.num_inner_steps}")
        require(cfg.outer_lr > 0, "algorithm.outer_lr", f"must be > 0, got {cfg.outer_lr}")
        require(cfg.meta_batch_size >= 1, "algorithm.meta_batch_size", f"must be >= 1, got {cfg.meta_batch_size}")
        self.cfg = cfg
        self.loss_fn = loss_fn

    def meta_parameters(self, weights: dict) -> dict:
        return {"weights": weights}

    def inner_step(self, meta: dict, weights: dict, frozen: dict, x: mx.array, y: mx.array) -> dict:
        """One step of gradient descent on the support loss at ``inner_lr``."""
        return sgd_step(weights, mx.grad(self.loss_fn)(weights, frozen, x, y), self.cfg.inner_lr)

    def adapt(self, meta: dict, frozen: dict, x: mx.array, y: mx.array, num_steps: int | None = None) -> dict:
        weights = meta["weights"]
        for _ in range(self.cfg.num_inner_steps if num_steps is None else num_steps):
            weights = self.inner_step(meta, weights, frozen, x, y)
        return weights

    def meta_value_and_grad(self, meta: dict, frozen: dict, episodes: Episodes) -> tuple[mx.array, dict]:
        """The mean meta-training loss over the task batch and the (pseudo-)gradient the optimizer applies."""
        raise NotImplementedError

    def make_optimizer(self, num_iterations: int) -> optim.Optimizer:
        return optim.Adam(learning_rate=self.cfg.outer_lr)
