"""The shared vocabulary of the meta-learning algorithms, and the plain SGD inner loop they start from."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_map
from omegaconf import MISSING

from metapeft.config import require
from metapeft.tasks.base import Episodes

LossFn = Callable[[dict, dict, mx.array, mx.array], mx.array]


@dataclass
class AlgorithmConfig:
    name: str = MISSING
    inner_lr: float = MISSING  # the task config's default_inner_lr unless overridden
    num_inner_steps: int = 1
    outer_lr: float = 0.001
    meta_batch_size: int = 25


def sgd_step(weights: dict, grads: dict, lr) -> dict:
    """weights - lr * grads; ``lr`` is a scalar or a tree shaped like ``weights`` (Meta-SGD)."""
    if isinstance(lr, dict):
        return tree_map(lambda w, g, a: w - a * g, weights, grads, lr)
    return tree_map(lambda w, g: w - lr * g, weights, grads)


class MetaLearner:
    """Second-order MAML's structure; the other algorithms override one verb each."""

    first_order = False

    def __init__(self, cfg: AlgorithmConfig, loss_fn: LossFn):
        require(cfg.inner_lr >= 0, "algorithm.inner_lr", f"must be >= 0, got {cfg.inner_lr}")
        require(cfg.num_inner_steps >= 1, "algorithm.num_inner_steps", f"must be >= 1, got {cfg.num_inner_steps}")
        require(cfg.outer_lr > 0, "algorithm.outer_lr", f"must be > 0, got {cfg.outer_lr}")
        require(cfg.meta_batch_size >= 1, "algorithm.meta_batch_size", f"must be >= 1, got {cfg.meta_batch_size}")
        self.cfg = cfg
        self.loss_fn = loss_fn

    def meta_parameters(self, weights: dict) -> dict:
        """What the outer loop learns, starting from these adapted-tree weights."""
        return {"weights": weights}

    def inner_step(self, meta: dict, weights: dict, frozen: dict, x: mx.array, y: mx.array) -> dict:
        """One step of gradient descent on the support loss, differentiable unless ``first_order``."""
        grads = mx.grad(self.loss_fn)(weights, frozen, x, y)
        if self.first_order:
            grads = tree_map(mx.stop_gradient, grads)
        return sgd_step(weights, grads, self.cfg.inner_lr)

    def adapt(self, meta: dict, frozen: dict, x: mx.array, y: mx.array, num_steps: int | None = None) -> dict:
        weights = meta["weights"]
        for _ in range(self.cfg.num_inner_steps if num_steps is None else num_steps):
            weights = self.inner_step(meta, weights, frozen, x, y)
        return weights

    def query_loss(self, meta: dict, frozen: dict, xs, ys, xq, yq) -> mx.array:
        return self.loss_fn(self.adapt(meta, frozen, xs, ys), frozen, xq, yq)

    def meta_loss(self, meta: dict, frozen: dict, episodes: Episodes) -> mx.array:
        """Mean query loss after adaptation over the task batch (vectorized over tasks)."""
        per_task = mx.vmap(self.query_loss, in_axes=(None, None, 0, 0, 0, 0))
        return mx.mean(per_task(meta, frozen, *episodes))

    def meta_value_and_grad(self, meta: dict, frozen: dict, episodes: Episodes) -> tuple[mx.array, dict]:
        return mx.value_and_grad(self.meta_loss)(meta, frozen, episodes)

    def make_optimizer(self, num_iterations: int) -> optim.Optimizer:
        return optim.Adam(learning_rate=self.cfg.outer_lr)
