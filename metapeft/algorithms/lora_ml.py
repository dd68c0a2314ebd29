"""LoRA-ML (Block, Srinivasan, Collins, Mokhtari & Shakkottai, "Provable Meta-Learning with Low-Rank Adaptations",
NeurIPS 2025, Algorithm 1): the base fitted jointly with one low-rank adapter per training task.

    T fixed training tasks, adapter_t kept across iterations (the run's PEFT method, one per task):
    for each iteration:   a minibatch S of training tasks
        (W, {adapter_t})  <-  Adam step on  mean_{t in S} L_t(W, adapter_t)     (support and query examples alike)

No inner loop: a task's adapter is not re-fitted from a fixed start at every iteration (as the bilevel form,
``algorithm.meta_learn=backbone``, does) but persists and is optimized with the base. The paper proves that for
linear models with rank-k task perturbations the joint optimum recovers the shared matrix A* exactly once T >= 3,
and not for T = 1. What it learns for new tasks is the base W (``meta_learn=backbone``): a new task's adapter starts
at the method's plain initialization (LoRA: B = 0) and is fitted on its support set; the per-task adapters are kept
in the checkpoint (``task_adapters``) but are nothing a new task uses. Needs a task family with a fixed set of
training tasks (``num_fixed_train_tasks``: ``task=low_rank``, ``task=glyph_pairs``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metapeft.algorithms.base import AlgorithmConfig, MetaLearn, MetaLearner
from metapeft.backend import mx, utils
from metapeft.errors import require
from metapeft.registry import ALGORITHMS
from metapeft.tasks.base import FixedTaskEpisodes


@dataclass
class LoRAMLConfig(AlgorithmConfig):
    name: str = "lora_ml"
    meta_learn: MetaLearn = MetaLearn.backbone  # the base; the only choice (see the module's docstring)


@ALGORITHMS.register("lora_ml", LoRAMLConfig)
class LoRAML(MetaLearner):
    def __init__(self, cfg: LoRAMLConfig, objective):
        super().__init__(cfg, objective)
        self.num_tasks = objective.num_fixed_train_tasks
        require(self.num_tasks is not None, "algorithm", "lora_ml keeps one adapter per training task, and this "
                "task family draws new training tasks every iteration: use a family with a fixed set of training "
                "tasks (task=low_rank, task=glyph_pairs) or another algorithm (maml, fomaml, reptile, metasgd, anil, "
                "protonet)")
        require(cfg.meta_learn == MetaLearn.backbone, "algorithm.meta_learn", "lora_ml learns the base a new "
                f"task's adapter starts over (meta_learn=backbone), got {cfg.meta_learn}")

    def initial_meta(self, weights: dict, backbone: dict) -> dict:
        """The base and the adapters' plain start (``weights``, fixed), and that start once per training task."""
        meta = super().initial_meta(weights, backbone)
        return {**meta, "task_adapters": utils.tree_map(
            lambda w: mx.array(np.broadcast_to(np.array(w), (self.num_tasks, *w.shape))), weights)}

    def training_batch(self, task, num_tasks: int, shots: int, rng: np.random.Generator) -> FixedTaskEpisodes:
        """A minibatch of distinct training tasks (all of them when the meta-batch is larger)."""
        chosen = rng.permutation(self.num_tasks)[: min(num_tasks, self.num_tasks)]
        return task.sample_fixed(chosen, shots, rng)

    def joint_loss(self, meta: dict, frozen: dict, episodes: FixedTaskEpisodes) -> mx.array:
        frozen = self.task_frozen(meta, frozen)
        adapters = utils.tree_map(lambda a: a[episodes.task], meta["task_adapters"])
        x = mx.concatenate([episodes.xs, episodes.xq], axis=1)
        y = mx.concatenate([episodes.ys, episodes.yq], axis=1)
        return mx.mean(mx.vmap(lambda adapter, x, y: self.loss_fn(adapter, frozen, x, y))(adapters, x, y))

    def meta_value_and_grad(self, meta: dict, frozen: dict, episodes: FixedTaskEpisodes) -> tuple[mx.array, dict]:
        require(isinstance(episodes, FixedTaskEpisodes), "algorithm", "lora_ml trains on its fixed tasks by index")
        return mx.value_and_grad(self.joint_loss)(meta, frozen, episodes)
