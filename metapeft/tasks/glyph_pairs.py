"""Binary tasks over the glyph benchmark with a fixed set of training tasks: the vision setting of Block et al.
(NeurIPS 2025) in this project's terms. A task tells two characters apart.

    meta-training and pretraining:  T fixed pairs of meta-train characters (``task.num_train_tasks``, default 4)
    meta-validation / meta-test:    random pairs of meta-validation / meta-test characters (alphabets never seen)

The pretrained backbone ("standard retraining") is fitted to the training tasks' data pooled: one 2T-way
classifier over their characters. ``algorithm=lora_ml`` fits a base with one adapter per training pair;
``algorithm.meta_learn=backbone`` meta-learns the base through an inner loop. A new pair's adapter starts from its
plain initialization over each of them (``evaluation.finetune_meta_learned=true``). The benchmark's images are
``task=glyphs``'s (``metapeft.glyph_benchmark``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metapeft.backend import mx
from metapeft.errors import require
from metapeft.registry import TASKS
from metapeft.tasks.base import Episodes, FixedTaskEpisodes
from metapeft.tasks.glyphs import Glyphs, GlyphsConfig


@dataclass
class GlyphPairsConfig(GlyphsConfig):
    name: str = "glyph_pairs"
    n_way: int = 2
    num_train_tasks: int = 4  # T: the fixed pairs of meta-train characters
    pair_seed: int = 0  # which pairs


@TASKS.register("glyph_pairs", GlyphPairsConfig)
class GlyphPairs(Glyphs):
    def __init__(self, cfg: GlyphPairsConfig):
        require(cfg.n_way == 2, "task.n_way", f"a glyph_pairs task tells two characters apart: must be 2, got "
                f"{cfg.n_way} (task=glyphs has N-way tasks)")
        require(cfg.num_train_tasks >= 1, "task.num_train_tasks", f"must be >= 1, got {cfg.num_train_tasks}")
        super().__init__(cfg)
        train = self.class_images["train"]
        require(2 * cfg.num_train_tasks <= len(train), "task.num_train_tasks", f"{cfg.num_train_tasks} pairs need "
                f"{2 * cfg.num_train_tasks} distinct characters; the meta-train split has {len(train)}")
        picks = np.random.default_rng([cfg.pair_seed, 8]).choice(len(train), 2 * cfg.num_train_tasks, replace=False)
        self.train_pairs = picks.reshape(cfg.num_train_tasks, 2)
        # retraining: the training pairs' characters pooled, one class each
        self.pretraining_outputs = 2 * cfg.num_train_tasks
        self.pretraining_images = np.concatenate([train[c] for c in picks])
        self.pretraining_labels = np.concatenate([np.full(len(train[c]), i, np.int32) for i, c in enumerate(picks)])

    @property
    def num_fixed_train_tasks(self) -> int:
        return self.cfg.num_train_tasks

    def sample_with_classes(self, split: str, num_tasks: int, shots: int, rng: np.random.Generator):
        """Meta-validation and meta-test: random pairs of that split's characters; meta-training: the fixed pairs."""
        if split != "train":
            return super().sample_with_classes(split, num_tasks, shots, rng)
        fixed = self.sample_fixed(rng.integers(self.cfg.num_train_tasks, size=num_tasks), shots, rng)
        return Episodes(*fixed[:4]), None

    def sample_fixed(self, tasks: np.ndarray, shots: int, rng: np.random.Generator) -> FixedTaskEpisodes:
        episodes, _ = self.episodes_of(self.class_images["train"], len(tasks), shots, rng,
                                       lambda t: self.train_pairs[tasks[t]])
        return FixedTaskEpisodes(*episodes, mx.array(np.asarray(tasks)))
