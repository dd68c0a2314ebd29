"""Linear tasks that differ from a shared matrix by a low-rank perturbation: the synthetic setting of Block,
Srinivasan, Collins, Mokhtari & Shakkottai, "Provable Meta-Learning with Low-Rank Adaptations" (NeurIPS 2025).

    task t:   y = x (A* + U_t U_t^T) + noise,    x ~ N(0, I_d),   A* (d x d) shared,   U_t (d x k)

A* has N(0, 1/d) entries and each U_t N(0, 1/sqrt(d)) entries, so the shared part and a task's perturbation are of
comparable size; both come from ``task_seed``, which every run shares. Meta-training draws from
``num_train_tasks`` fixed tasks; validation and test tasks each get a fresh U_t. The multi-task pretrained backbone
(``pretrain``: one map fitted to the pooled data of the training tasks) is the paper's "standard retraining": it
converges to A* + mean_t U_t U_t^T, which a rank-k adapter cannot undo on a new task (the error floor the paper
proves); ``algorithm.meta_learn=backbone`` is its LoRA-ML. ``oracle_backbone`` is the map an oracle knowing A* would
start from. Use with ``model=linear`` and ``peft=lora peft.rank=k``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metapeft.backend import mx
from metapeft.errors import require
from metapeft.registry import TASKS
from metapeft.tasks.base import Episodes, FixedTaskEpisodes, TaskConfig, TaskFamily


@dataclass
class LowRankConfig(TaskConfig):
    name: str = "low_rank"
    dim: int = 16  # d: inputs and outputs
    rank: int = 2  # k: the rank of every task's perturbation
    num_train_tasks: int = 20  # T: the fixed tasks meta-training and pretraining draw from
    noise: float = 0.1  # standard deviation of the label noise
    num_query: int = 50  # query examples per task
    task_seed: int = 0  # A* and the training tasks' U_t
    default_inner_lr: float = 0.1
    default_meta_batch_size: int = 10


@TASKS.register("low_rank", LowRankConfig)
class LowRank(TaskFamily):
    metric_name = "mse"
    higher_is_better = False

    def __init__(self, cfg: LowRankConfig):
        require(cfg.dim >= 1, "task.dim", f"must be >= 1, got {cfg.dim}")
        require(1 <= cfg.rank <= cfg.dim, "task.rank", f"must be in 1..task.dim={cfg.dim}, got {cfg.rank}")
        require(cfg.num_train_tasks >= 1, "task.num_train_tasks", f"must be >= 1, got {cfg.num_train_tasks}")
        require(cfg.noise >= 0, "task.noise", f"must be >= 0, got {cfg.noise}")
        require(cfg.num_query >= 1, "task.num_query", f"must be >= 1, got {cfg.num_query}")
        self.cfg = cfg
        self.input_shape, self.output_dim, self.pretraining_outputs = (cfg.dim,), cfg.dim, cfg.dim
        rng = np.random.default_rng([cfg.task_seed, 7])
        self.shared = rng.normal(0, cfg.dim ** -0.5, (cfg.dim, cfg.dim))
        self.train_maps = self.shared + self.perturbations(cfg.num_train_tasks, rng)

    def perturbations(self, num_tasks: int, rng: np.random.Generator) -> np.ndarray:
        u = rng.normal(0, self.cfg.dim ** -0.25, (num_tasks, self.cfg.dim, self.cfg.rank))
        return u @ u.transpose(0, 2, 1)

    def loss(self, prediction: mx.array, target: mx.array) -> mx.array:
        return mx.mean(mx.square(prediction - target))

    metric = loss

    def labelled(self, maps: np.ndarray, num_examples: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """(tasks, examples, d) inputs and their noisy labels under each task's map."""
        x = rng.normal(size=(len(maps), num_examples, self.cfg.dim))
        return x, x @ maps + self.cfg.noise * rng.normal(size=x.shape)

    @property
    def num_fixed_train_tasks(self) -> int:
        return self.cfg.num_train_tasks

    def sample(self, split: str, num_tasks: int, shots: int, rng: np.random.Generator) -> Episodes:
        if split == "train":
            return Episodes(*self.sample_fixed(rng.integers(self.cfg.num_train_tasks, size=num_tasks), shots, rng)[:4])
        return self.episodes(self.shared + self.perturbations(num_tasks, rng), shots, rng)

    def sample_fixed(self, tasks: np.ndarray, shots: int, rng: np.random.Generator) -> FixedTaskEpisodes:
        return FixedTaskEpisodes(*self.episodes(self.train_maps[tasks], shots, rng), mx.array(tasks))

    def episodes(self, maps: np.ndarray, shots: int, rng: np.random.Generator) -> Episodes:
        x, y = (mx.array(a, dtype=mx.float32) for a in self.labelled(maps, shots + self.cfg.num_query, rng))
        return Episodes(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])

    def pretraining_batch(self, rng: np.random.Generator, batch_size: int) -> tuple[mx.array, mx.array]:
        """The training tasks' data pooled: each example from a training task drawn at random."""
        maps = self.train_maps[rng.integers(self.cfg.num_train_tasks, size=batch_size)]
        x, y = self.labelled(maps, 1, rng)
        return mx.array(x[:, 0], dtype=mx.float32), mx.array(y[:, 0], dtype=mx.float32)

    def oracle_backbone(self) -> dict:
        """The map an oracle that knows A* starts from."""
        return {"map": {"weight": mx.array(self.shared, dtype=mx.float32), "bias": mx.zeros((self.cfg.dim,))}}
