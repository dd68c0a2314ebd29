"""The vocabulary every meta-learning algorithm shares, and the plain gradient step they adapt with.

    meta_parameters(weights)                 what the outer loop learns, starting from an adapted tree
    initial_meta(weights, backbone)          that, and the backbone when algorithm.meta_learn says so
    task_frozen(meta, frozen)                the frozen tree tasks see: with the meta-learned backbone, if any
    task_start(meta, frozen, x, y)           where adaptation to a task starts: the meta-learned weights, with the
                                             head built from the support set's class prototypes if head_init says so
    inner_step(meta, weights, frozen, x, y)  one task-specific update on a support set
    adapt(meta, frozen, x, y)                num_inner_steps inner steps from task_start
    training_batch(task, n, shots, rng)      the meta-training tasks of one iteration (a family's own draw)
    meta_value_and_grad(meta, frozen, eps)   the outer objective and its gradient over a batch of tasks
    make_optimizer(num_iterations)           the outer update rule

An algorithm never knows which task or PEFT method it runs on: it sees the adapted tree, the frozen tree and an
``Objective``. One file per algorithm (``maml.py``, ...) fills in what is its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Callable, Optional, Protocol

from omegaconf import MISSING

from metapeft.backend import mx, optim, utils
from metapeft.errors import require
from metapeft.tasks.base import Episodes
from metapeft.trees import merge

LossFn = Callable[[dict, dict, "mx.array", "mx.array"], "mx.array"]  # (adapted, frozen, x, y) -> loss


class Objective(Protocol):
    """What an algorithm sees of an experiment."""

    num_classes: int | None  # N of N-way classification; None for regression
    num_fixed_train_tasks: int | None  # T where meta-training draws from T fixed tasks; None for fresh draws

    def loss(self, adapted: dict, frozen: dict, x: mx.array, y: mx.array) -> mx.array: ...

    def features(self, adapted: dict, frozen: dict, x: mx.array) -> mx.array:
        """The embedding the head (``adapted["head"]``, a linear layer) reads."""


class MetaLearn(StrEnum):
    """What the outer loop learns."""

    adapter = "adapter"  # the adapted tree's initialization (PEFT parameters and head) over a fixed backbone
    # The backbone, so that the PEFT method adapts it well; every task's adapter starts at the method's fixed
    # initialization (LoRA's B = 0). Priming (Gheini et al., 2022) and the bilevel form of LoRA-ML (Block et al.,
    # 2025): the inner loop adapts only the adapter and the head, the outer loop the backbone.
    backbone = "backbone"
    both = "both"  # the backbone and the adapter's initialization


class HeadInit(StrEnum):
    learned = "learned"  # the meta-learned head
    prototypes = "prototypes"  # Proto-MAML (Triantafillou et al., 2020): from the support set's class prototypes


@dataclass
class AlgorithmConfig:
    name: str = MISSING
    inner_lr: float = "${task.default_inner_lr}"  # type: ignore[assignment]
    num_inner_steps: int = 1
    # Adam's learning rate: 0.001, or what a model needs (model.default_outer_lr: a pretrained encoder, 1e-4)
    outer_lr: float = "${oc.select:model.default_outer_lr,0.001}"  # type: ignore[assignment]
    meta_batch_size: int = "${task.default_meta_batch_size}"  # type: ignore[assignment]
    head_init: HeadInit = HeadInit.learned
    # Tasks of a meta-batch whose gradient is taken in one pass; the passes' gradients are averaged (every
    # algorithm's (pseudo-)gradient is a mean over tasks). null: the whole meta-batch at once. Fewer tasks per
    # pass hold fewer activations: second-order MAML over a pretrained encoder needs it. The default is the model's
    # (model.default_tasks_per_pass: 1 on the encoder, where one task a pass is also faster; else null).
    tasks_per_pass: Optional[int] = "${oc.select:model.default_tasks_per_pass,null}"  # type: ignore[assignment]
    # Passes whose gradients are taken at once, each on a CPU stream and thread of its own (metapeft.streams): MLX
    # runs a stream's element-wise kernels on one thread, so two streams can use two cores. It paid only with one
    # BLAS thread a stream (METAPEFT_BLAS_THREADS=1; docs/performance.md, "Two CPU streams"). With tasks_per_pass
    # null, the meta-batch is split into this many passes. 1: one pass at a time.
    parallel_passes: int = 1
    # Recompute each inner step's activations during the meta-gradient instead of keeping them (``mx.checkpoint``):
    # memory for time. MLX cannot vmap it, so it needs tasks_per_pass=1 (one task: no vmap).
    checkpoint_inner_steps: bool = False
    meta_learn: MetaLearn = MetaLearn.adapter  # see MetaLearn; backbone and both need a PEFT method (peft != none)
    backbone_outer_lr: float = "${.outer_lr}"  # type: ignore[assignment]  # Adam's rate for the backbone


def prototype_head(features: mx.array, labels: mx.array, num_classes: int) -> dict:
    """The linear head whose logits are -||f - c_k||^2 + ||f||^2 for class prototypes (means) c_k:
    weight 2 c_k, bias -||c_k||^2. Softmax ignores the ||f||^2 shared by all classes, so this head classifies
    by squared Euclidean distance to the prototypes, as ProtoNet does (Snell et al., 2017, eq. 1-2)."""
    one_hot = (labels[..., None] == mx.arange(num_classes)).astype(features.dtype)
    prototypes = (one_hot.T @ features) / mx.sum(one_hot, axis=0)[:, None]
    return {"weight": 2 * prototypes.T, "bias": -mx.sum(mx.square(prototypes), axis=-1)}


def map_tasks(fn: Callable, *batched: mx.array):
    """``fn`` over the leading (task) axis of ``batched``, vectorized with ``vmap``. A single task runs without
    ``vmap``, so transforms MLX cannot vmap (``mx.checkpoint``) work inside it."""
    if batched[0].shape[0] == 1:
        return utils.tree_map(lambda a: a[None], fn(*(a[0] for a in batched)))
    return mx.vmap(fn)(*batched)


def sgd_step(weights: dict, grads: dict, lr) -> dict:
    """weights - lr * grads; ``lr`` is a scalar or a tree shaped like ``weights`` (Meta-SGD)."""
    if isinstance(lr, dict):
        return utils.tree_map(lambda w, g, a: w - a * g, weights, grads, lr)
    return utils.tree_map(lambda w, g: w - lr * g, weights, grads)


class MetaLearner:
    min_inner_steps = 1

    def __init__(self, cfg: AlgorithmConfig, objective: Objective):
        require(cfg.inner_lr >= 0, "algorithm.inner_lr", f"must be >= 0, got {cfg.inner_lr}")
        require(cfg.num_inner_steps >= self.min_inner_steps, "algorithm.num_inner_steps",
                f"must be >= {self.min_inner_steps}, got {cfg.num_inner_steps}")
        require(cfg.outer_lr > 0, "algorithm.outer_lr", f"must be > 0, got {cfg.outer_lr}")
        require(cfg.meta_batch_size >= 1, "algorithm.meta_batch_size", f"must be >= 1, got {cfg.meta_batch_size}")
        require(cfg.head_init == HeadInit.learned or objective.num_classes is not None, "algorithm.head_init",
                "prototypes need a classification task (task=digits or task=image_folder); use head_init=learned")
        require(cfg.tasks_per_pass is None or cfg.tasks_per_pass >= 1, "algorithm.tasks_per_pass",
                f"must be >= 1 or null (the whole meta-batch), got {cfg.tasks_per_pass}")
        require(cfg.parallel_passes >= 1, "algorithm.parallel_passes",
                f"must be >= 1 (1: one pass at a time), got {cfg.parallel_passes}")
        require(not cfg.checkpoint_inner_steps or cfg.tasks_per_pass == 1, "algorithm.checkpoint_inner_steps",
                "needs algorithm.tasks_per_pass=1: MLX cannot vmap a checkpointed function over tasks")
        require(cfg.meta_learn == MetaLearn.adapter or cfg.backbone_outer_lr > 0, "algorithm.backbone_outer_lr",
                f"must be > 0, got {cfg.backbone_outer_lr}")
        self.cfg = cfg
        self.objective = objective
        self.loss_fn = objective.loss

    @property
    def learns_backbone(self) -> bool:
        return self.cfg.meta_learn in (MetaLearn.backbone, MetaLearn.both)

    @property
    def learns_adapter(self) -> bool:
        return self.cfg.meta_learn in (MetaLearn.adapter, MetaLearn.both)

    def meta_parameters(self, weights: dict) -> dict:
        return {"weights": weights}

    def initial_meta(self, weights: dict, backbone: dict) -> dict:
        """``meta_parameters(weights)``, and under ``meta_learn=backbone|both`` the backbone (the frozen tree's
        learnable part) as ``meta["backbone"]``."""
        meta = self.meta_parameters(weights)
        # Its own containers: under MLX's grad a dict that is both in the differentiated argument and, the same
        # object, in the frozen tree gets a zero gradient (MLX 0.32; learnable_backbone often returns that dict).
        return {**meta, "backbone": utils.tree_map(lambda leaf: leaf, backbone)} if self.learns_backbone else meta

    @staticmethod
    def task_frozen(meta: dict, frozen: dict) -> dict:
        """The frozen tree every task of this meta-iteration adapts over: the meta-learned backbone where there is
        one (differentiable: the meta-gradient reaches it through the inner loop), else ``frozen`` itself."""
        return merge(frozen, meta["backbone"]) if "backbone" in meta else frozen

    def task_start(self, meta: dict, frozen: dict, x: mx.array, y: mx.array) -> dict:
        weights = meta["weights"]
        if not self.learns_adapter:  # meta_learn=backbone: every task starts at the fixed initialization
            weights = utils.tree_map(mx.stop_gradient, weights)
        if self.cfg.head_init == HeadInit.prototypes:
            features = self.objective.features(weights, frozen, x)
            weights = {**weights, "head": prototype_head(features, y, self.objective.num_classes)}
        return weights

    def inner_step(self, meta: dict, weights: dict, frozen: dict, x: mx.array, y: mx.array) -> dict:
        """One step of gradient descent on the support loss at ``inner_lr``."""
        return sgd_step(weights, mx.grad(self.loss_fn)(weights, frozen, x, y), self.cfg.inner_lr)

    def adapt(self, meta: dict, frozen: dict, x: mx.array, y: mx.array, num_steps: int | None = None) -> dict:
        weights = self.task_start(meta, frozen, x, y)
        step = lambda meta, weights: self.inner_step(meta, weights, frozen, x, y)
        if self.cfg.checkpoint_inner_steps:  # the frozen tree and the data are constants to it (token ids have no
            step = mx.checkpoint(step)  # gradient, which mx.checkpoint would otherwise try to take)
        for _ in range(self.cfg.num_inner_steps if num_steps is None else num_steps):
            weights = step(meta, weights)
        return weights

    def training_batch(self, task, num_tasks: int, shots: int, rng) -> Episodes:
        """One meta-iteration's training tasks: the family's draw (LoRA-ML asks for its fixed tasks by index)."""
        return task.sample("train", num_tasks, shots, rng)

    def meta_value_and_grad(self, meta: dict, frozen: dict, episodes: Episodes) -> tuple[mx.array, dict]:
        """The mean meta-training loss over the task batch and the (pseudo-)gradient the optimizer applies."""
        raise NotImplementedError

    def make_optimizer(self, num_iterations: int) -> optim.Optimizer:
        """Adam at ``outer_lr``; the backbone, when it is meta-learned, at ``backbone_outer_lr``."""
        if not self.learns_backbone:
            return optim.Adam(learning_rate=self.cfg.outer_lr)
        return optim.MultiOptimizer([optim.Adam(learning_rate=self.cfg.backbone_outer_lr),
                                     optim.Adam(learning_rate=self.cfg.outer_lr)],
                                    [lambda path, weight: path.startswith("backbone.")])
