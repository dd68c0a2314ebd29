"""What a PEFT method provides: the frozen tree, a fresh adapted tree, and the forward pass over both.

The adapted tree holds the task head (``"head"``; none where the model has none, a language model's output layer
being part of the frozen backbone) and the method's own parameters; the frozen tree is the (pretrained) backbone
without its head. Algorithms see only the adapted tree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List

from omegaconf import MISSING

from metapeft.backend import mx
from metapeft.errors import require
from metapeft.models.layers import Backbone
from metapeft.peft.targets import target_layers, without_head
from metapeft.trees import Path, get_in, merge, path_name, paths_holding, set_in


@dataclass
class PeftConfig:
    name: str = MISSING


class PeftMethod:
    uses_pretrained_backbone = True  # adapt a pretrained, frozen backbone
    needs_meta_learned_adapter = False  # its state follows the adapter's meta-gradient (AdaLoRA's pruning)

    def __init__(self, cfg: PeftConfig, model: Backbone):
        self.cfg = cfg
        self.model = model

    def check(self, backbone: dict) -> None:
        """Raise ConfigError if the settings do not fit this backbone's layers (called before any training)."""

    def frozen(self, backbone: dict) -> dict:
        return without_head(backbone)

    def learnable_backbone(self, frozen: dict) -> dict:
        """The backbone's weights in the frozen tree: what ``algorithm.meta_learn=backbone|both`` meta-learns (a
        method's own state there, AdaLoRA's masks, is left out)."""
        return frozen

    def init_adapted(self, backbone: dict, key: mx.array, sample_inputs: mx.array) -> dict:
        """A fresh adapted tree: a new task head (where the model has one) and the method's parameters at their
        initialization."""
        head_key, adapter_key = mx.random.split(key)
        head = {k: v for k, v in self.model.init(head_key).items() if k == "head"}
        return {**head, **self.init_adapter(backbone, adapter_key, sample_inputs)}

    def init_adapter(self, backbone: dict, key: mx.array, sample_inputs: mx.array) -> dict:
        raise NotImplementedError

    def __call__(self, adapted: dict, frozen: dict, x: mx.array, train: bool = False) -> mx.array:
        """The adapted model's predictions; ``train`` is true while adapting (LoRA's dropout acts then)."""
        return self.model.head_output(adapted.get("head", {}), self.features(adapted, frozen, x, train))

    def features(self, adapted: dict, frozen: dict, x: mx.array, train: bool = False) -> mx.array:
        """What the head reads: the adapted model without its head."""
        return self.model.features(merge(frozen, adapted), x)

    def regularizer(self, adapted: dict) -> mx.array | float:
        """Added to the task loss in the inner and the outer loop."""
        return 0.0

    def init_meta_state(self, meta_weights: dict) -> Any:
        """What the method carries from one meta-iteration to the next (AdaLoRA: importance averages), as data."""
        return None

    def after_meta_step(self, meta_weights: dict, meta_grads: dict, frozen: dict, state: Any, iteration: int,
                        num_iterations: int) -> tuple[dict, Any]:
        """Between meta-iterations a method may update its non-adapted state (AdaLoRA: the rank masks in the
        frozen tree). Returns the frozen tree and the state for the next call."""
        return frozen, state

    def first_keepable_iteration(self, num_iterations: int) -> int:
        """The first meta-iteration whose state ``keep=best_val`` may keep (AdaLoRA: once its budget is final)."""
        return 0

    def report(self, frozen: dict) -> dict:
        """Method-specific facts for ``metrics.json``."""
        return {}

    # Formats other tools read (``metapeft.export``). A method that has one sets ``hf_peft_type`` and brings its own
    # tensors, config and merge, as mlx-lm's LoRA layer brings ``fuse()``.
    hf_peft_type: str | None = None  # Hugging Face peft's name of this method; None: no adapter format

    def hf_adapter_tensors(self, adapted: dict, frozen: dict, prefix: str) -> dict:
        """The adapter's tensors under Hugging Face peft's names and layouts (PyTorch's (out, in))."""
        raise NotImplementedError

    def hf_adapter_config(self, adapted: dict, num_iterations: int) -> dict:
        """This method's entries of Hugging Face peft's ``adapter_config.json`` (``peft_type`` and the base model
        are the exporter's)."""
        raise NotImplementedError

    @staticmethod
    def hf_layer_config(target_modules: list[str]) -> dict:
        """The entries every peft method that wraps layers has (LoRA, AdaLoRA, (IA)^3), for these modules."""
        return {"target_modules": sorted(target_modules), "fan_in_fan_out": False, "modules_to_save": None}

    def merged(self, adapted: dict, frozen: dict) -> dict:
        """The backbone with the adapter folded in (only the backbone's own entries)."""
        raise NotImplementedError


@dataclass
class LowRankConfig(PeftConfig):
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])  # see metapeft.peft.targets
    alpha: float = 8.0


class LowRankMethod(PeftMethod):
    """Shared by LoRA and AdaLoRA: a low-rank update of ``rank_key``'s rank on each targeted linear layer."""

    rank_key: str  # the config key of the rank each targeted layer gets
    down_key: str  # the adapted tree's name of the down-projection factor (marks an adapted layer)

    @property
    def scale(self) -> float:
        """The update's factor, alpha / rank (the rank at ``rank_key``)."""
        return self.cfg.alpha / getattr(self.cfg, self.rank_key.split(".")[-1])

    def check(self, backbone: dict) -> None:
        self.target_layers(backbone)

    def low_rank_factors(self, adapted: dict, frozen: dict) -> dict[str, tuple]:
        """module name -> (down (in, r), per-rank scale (r,), up (r, out)): the update is scale * down diag(.) up."""
        raise NotImplementedError

    def merged(self, adapted: dict, frozen: dict) -> dict:
        """Each targeted layer's weight replaced by W + scale * down diag(s) up; the method's own state dropped."""
        factors, updates = self.low_rank_factors(adapted, frozen), {}
        for path in paths_holding(frozen, "weight"):
            if path_name(path) in factors:
                down, singular, up = factors[path_name(path)]
                update = self.scale * ((down * singular) @ up)
                set_in(updates, path, {"weight": get_in(frozen, path)["weight"] + update})
        return merge(self.learnable_backbone(frozen), updates)

    def hf_common_config(self, adapted: dict) -> dict:
        return {**self.hf_layer_config([path_name(p) for p in paths_holding(adapted, self.down_key)]),
                "bias": "none", "lora_alpha": self.cfg.alpha, "lora_dropout": float(getattr(self.cfg, "dropout", 0.0))}

    def target_layers(self, backbone: dict) -> list[tuple[Path, dict]]:
        """The targeted linear layers, each checked to admit the rank."""
        chosen = target_layers(self.model, backbone, self.cfg.target_modules)
        rank = getattr(self.cfg, self.rank_key.split(".")[-1])
        for path, layer in chosen:
            fan_in, fan_out = layer["weight"].shape
            require(1 <= rank <= min(fan_in, fan_out), self.rank_key,
                    f"must be in 1..{min(fan_in, fan_out)} for layer {path_name(path)} ({fan_in}x{fan_out}), "
                    f"got {rank}; lower it or leave that layer out of peft.target_modules")
        return chosen
