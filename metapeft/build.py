"""From a config to the parts of an experiment, and their starting state.

Data flows one way: config -> task family, backbone, PEFT method, algorithm (``build``) -> the frozen tree, the
adapted tree to meta-learn from and the plain initialization the baseline adapts (``initial_state``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from omegaconf import DictConfig

from metapeft.algorithms.base import MetaLearner
from metapeft.backend import mx
from metapeft.config import register_configs, validate_common
from metapeft.errors import require
from metapeft.peft.base import PeftMethod
from metapeft.pretrain import pretrained_backbone
from metapeft.registry import ALGORITHMS, MODELS, PEFT_METHODS, TASKS
from metapeft.tasks.base import TaskFamily
from metapeft.trees import count, nbytes


@dataclass
class Experiment:
    cfg: DictConfig
    task: TaskFamily
    model: Any
    peft: PeftMethod
    learner: MetaLearner

    def loss(self, adapted: dict, frozen: dict, x: mx.array, y: mx.array) -> mx.array:
        return self.task.loss(self.peft(adapted, frozen, x, train=True), y) + self.peft.regularizer(adapted)

    def metric(self, adapted: dict, frozen: dict, x: mx.array, y: mx.array) -> mx.array:
        return self.task.metric(self.peft(adapted, frozen, x), y)

    def features(self, adapted: dict, frozen: dict, x: mx.array) -> mx.array:
        return self.peft.features(adapted, frozen, x, train=True)

    def meta_validation_episodes(self):
        """The ``mode.num_val_tasks`` meta-validation tasks that meta-training validates on (and multi-task
        retraining keeps its best weights by): the same tasks for every run with this seed."""
        return self.task.sample("val", self.cfg.mode.num_val_tasks, self.cfg.shots.train,
                                np.random.default_rng([self.cfg.seed, 1]))

    @property
    def num_classes(self) -> int | None:
        return self.task.num_classes

    @property
    def num_fixed_train_tasks(self) -> int | None:
        return self.task.num_fixed_train_tasks


def build(cfg: DictConfig) -> Experiment:
    """Construct every component; each checks its own keys, so bad input fails here, before any training."""
    register_configs()
    validate_common(cfg)
    task_class, model_class = TASKS.get(cfg.task.name), MODELS.get(cfg.model.name)
    reads_text, reads_tokens = getattr(task_class, "reads_text", False), getattr(model_class, "reads_tokens", False)
    require(reads_text == reads_tokens, "model", f"task={cfg.task.name} reads text, which model={cfg.model.name} "
            "cannot: use model=hf_encoder or model=causal_lm" if reads_text else f"model={cfg.model.name} reads "
            f"text; task={cfg.task.name} is not a text task: use task=text, task=text_folder or task=text_tasks")
    task = task_class(cfg.task)
    task.validate(sorted({cfg.shots.train, *cfg.shots.eval}))
    model = model_class(cfg.model, task.input_shape, task.output_dim)
    if reads_text:
        task.tokenize(model)  # once, in one batch: episodes are token ids from here on
    peft = PEFT_METHODS.get(cfg.peft.name)(cfg.peft, model)
    peft.check(model.init(mx.random.key(0)))  # target layers and ranks against the real layer shapes
    if getattr(task, "generative", False):
        refuse_head_algorithms(cfg)
    elif task.num_classes is None and cfg.algorithm.get("head_init") == "prototypes":
        protonet = cfg.algorithm.name == "protonet"
        require(False, "algorithm" if protonet else "algorithm.head_init",
                f"task={cfg.task.name} is regression, and {'ProtoNet' if protonet else 'head_init=prototypes'} "
                "classifies by class prototypes: use a classification task (task=digits, task=glyphs, ...) or "
                + ("another algorithm (maml, fomaml, reptile, metasgd, anil)" if protonet else "head_init=learned"))
    experiment = Experiment(cfg, task, model, peft, learner=None)  # type: ignore[arg-type]
    experiment.learner = ALGORITHMS.get(cfg.algorithm.name)(cfg.algorithm, experiment)
    learner = experiment.learner
    require(not learner.learns_backbone or peft.uses_pretrained_backbone, "algorithm.meta_learn",
            f"{cfg.algorithm.meta_learn} meta-learns the backbone a PEFT method adapts; with peft=none every "
            "parameter is already meta-learned: use meta_learn=adapter or a PEFT method (peft=lora, ...)")
    require(learner.learns_adapter or not peft.needs_meta_learned_adapter, "algorithm.meta_learn",
            f"peft={cfg.peft.name} follows its adapter's meta-gradient, which meta_learn=backbone does not take: "
            "use meta_learn=both")
    # the random state a pass advances lives on that pass's stream, which other threads cannot evaluate
    require(cfg.algorithm.parallel_passes == 1 or not cfg.peft.get("dropout"), "algorithm.parallel_passes",
            f"passes on parallel streams cannot draw LoRA's dropout masks (peft.dropout={cfg.peft.get('dropout')}): "
            "use algorithm.parallel_passes=1 or peft.dropout=0")
    return experiment


def refuse_head_algorithms(cfg: DictConfig) -> None:
    """A text-to-text task has no task head: its output layer is the language model's (vocabulary x width), frozen
    with the backbone, as Hugging Face peft leaves ``lm_head`` out."""
    valid = "maml, fomaml, reptile, metasgd (with a PEFT method)"
    require(cfg.algorithm.name != "protonet", "algorithm", f"task={cfg.task.name} generates text, and ProtoNet "
            f"classifies by class prototypes over a fixed set of labels: use {valid}")
    require(cfg.algorithm.name != "anil", "algorithm", f"ANIL adapts the task head alone; task={cfg.task.name}'s "
            f"output layer is the language model's, frozen with the backbone: use {valid}")
    require(cfg.algorithm.get("head_init") != "prototypes", "algorithm.head_init",
            f"task={cfg.task.name} has no task head to start from prototypes: use head_init=learned")


class InitialState(NamedTuple):
    backbone: dict  # pretrained (PEFT) or random (peft=none), with its pretraining head
    frozen: dict
    adapted: dict  # where meta-learning starts
    plain: dict  # another draw of the same initialization: what the plain_init baseline adapts
    pretraining: dict  # where the backbone came from
    sample_inputs: mx.array  # meta-train inputs (prompt initialization, inference timing)


def backbone_key(cfg: DictConfig) -> mx.array:
    """The key a backbone is initialized with before pretraining: from ``pretrain.seed`` (by default the run's)."""
    return mx.random.split(mx.random.key(cfg.pretrain.seed), 3)[0]


def pretrained(exp: Experiment) -> tuple[dict, dict]:
    """The backbone a PEFT method adapts and where it came from: a model's own pretrained weights (a Hugging Face
    checkpoint), or else the backbone pretrained on the meta-train split (cached)."""
    if hasattr(exp.model, "pretrained"):
        return exp.model.pretrained(backbone_key(exp.cfg), exp.task.pretraining_outputs)
    return pretrained_backbone(exp.cfg, type(exp.model), exp.task, backbone_key(exp.cfg), exp.cfg.progress)


def initial_state(exp: Experiment) -> InitialState:
    cfg = exp.cfg
    k_backbone, k_adapted, k_plain = mx.random.split(mx.random.key(cfg.seed), 3)
    pretraining: dict = {}
    if exp.peft.uses_pretrained_backbone:
        backbone, pretraining = pretrained(exp)
    else:
        backbone = exp.model.init(k_backbone)
    sample_inputs, _ = exp.task.pretraining_batch(np.random.default_rng([cfg.seed, 4]), 256)
    return InitialState(
        backbone=backbone,
        frozen=exp.peft.frozen(backbone),
        adapted=exp.peft.init_adapted(backbone, k_adapted, sample_inputs),
        plain=exp.peft.init_adapted(backbone, k_plain, sample_inputs),
        pretraining=pretraining,
        sample_inputs=sample_inputs,
    )


def parameter_counts(exp: Experiment, backbone: dict, adapted: dict, meta: dict) -> dict:
    """Total = frozen backbone (without its pretraining head) + adapted tree; meta-learned adds e.g. Meta-SGD's
    rates."""
    backbone_body = count(backbone) - count(backbone.get("head", {})) if exp.peft.uses_pretrained_backbone else 0
    total = backbone_body + count(adapted)
    return {
        "total": total,
        "adapted": count(adapted),
        "meta_learned": count(meta),
        "reduction_ratio": total / count(adapted),
        "adapter_bytes": nbytes(adapted),
        "meta_learned_bytes": nbytes(meta),
    }
