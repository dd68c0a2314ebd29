"""What a PEFT method provides: the frozen tree, a fresh adapted tree, and the forward pass over both.

The adapted tree always holds the task head (``"head"``) and the method's own parameters; the frozen tree is the
(pretrained) backbone without its head. Algorithms see only the adapted tree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import mlx.core as mx
from omegaconf import MISSING

from metapeft.config import require
from metapeft.models.layers import Backbone
from metapeft.trees import Path, linear_layers, merge, path_name


def without_head(backbone: dict) -> dict:
    return {k: v for k, v in backbone.items() if k != "head"}


@dataclass
class PeftConfig:
    name: str = MISSING


class PeftMethod:
    uses_pretrained_backbone = True  # adapt a pretrained, frozen backbone

    def __init__(self, cfg: PeftConfig, model: Backbone):
        self.cfg = cfg
        self.model = model

    def check(self, backbone: dict) -> None:
        """Raise ConfigError if the settings do not fit this backbone's layers (called before any training)."""

    def frozen(self, backbone: dict) -> dict:
        return without_head(backbone)

    def init_adapted(self, backbone: dict, key: mx.array, sample_inputs: mx.array) -> dict:
        """A fresh adapted tree: a new task head and the method's parameters at their initialization."""
        head_key, adapter_key = mx.random.split(key)
        return {"head": self.model.init(head_key)["head"], **self.init_adapter(backbone, adapter_key, sample_inputs)}

    def init_adapter(self, backbone: dict, key: mx.array, sample_inputs: mx.array) -> dict:
        raise NotImplementedError

    def __call__(self, adapted: dict, frozen: dict, x: mx.array, train: bool = False) -> mx.array:
        """The adapted model's predictions; ``train`` is true while adapting (LoRA's dropout acts then)."""
        return self.model(merge(frozen, adapted), x)

    def regularizer(self, adapted: dict) -> mx.array | float:
        """Added to the task loss in the inner and the outer loop."""
        return 0.0

    def after_meta_step(self, meta_weights: dict, meta_grads: dict, frozen: dict, iteration: int,
                        num_iterations: int) -> dict:
        """Between meta-iterations, a method may update its non-adapted state (AdaLoRA: the rank masks)."""
        return frozen

    def first_keepable_iteration(self, num_iterations: int) -> int:
        """The first meta-iteration whose state ``keep=best_val`` may keep (AdaLoRA: once its budget is final)."""
        return 0

    def report(self, frozen: dict) -> dict:
        """Method-specific facts for ``metrics.json``."""
        return {}


@dataclass
class LowRankConfig(PeftConfig):
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    alpha: float = 8.0


class LowRankMethod(PeftMethod):
    """Shared by LoRA and AdaLoRA: choosing the linear layers a low-rank update is added to."""

    rank_key: str  # the config key of the rank each targeted layer gets

    def check(self, backbone: dict) -> None:
        self.target_layers(backbone)

    def target_layers(self, backbone: dict) -> list[tuple[Path, dict]]:
        """The targeted linear layers. ``all-linear``: every linear layer but the input projection and the head.

        A target names a path component (``query``, ``attention``, ``mlp``, ``hidden``) or a whole path
        (``layers.0.mlp.fc1``, ``hidden.1``).
        """
        layers = list(linear_layers(without_head(backbone)))
        def matches(target: str, path: Path) -> bool:
            if target == "all-linear":
                return path[: len(self.model.input_layer)] != self.model.input_layer
            return target == path_name(path) or target in {str(k) for k in path}

        valid = sorted({"all-linear", *(str(k) for p, _ in layers for k in p if isinstance(k, str)),
                        *(path_name(p) for p, _ in layers)})
        require(len(self.cfg.target_modules) > 0, "peft.target_modules", f"must name at least one of {valid}")
        for target in self.cfg.target_modules:
            require(any(matches(target, p) for p, _ in layers), "peft.target_modules",
                    f"'{target}' matches no linear layer of model={type(self.model).__name__.lower()}; valid: {valid}")
        chosen = [(p, layer) for p, layer in layers if any(matches(t, p) for t in self.cfg.target_modules)]
        rank = getattr(self.cfg, self.rank_key.split(".")[-1])
        for path, layer in chosen:
            fan_in, fan_out = layer["weight"].shape
            require(1 <= rank <= min(fan_in, fan_out), self.rank_key,
                    f"must be in 1..{min(fan_in, fan_out)} for layer {path_name(path)} ({fan_in}x{fan_out}), "
                    f"got {rank}; lower it or leave that layer out of peft.target_modules")
        return chosen
