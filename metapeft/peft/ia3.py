"""(IA)^3 (Liu et al., 2022): learned vectors that rescale activations inside a frozen backbone.

    attention keys and values:  h = (x W + b) * l_out        feed-forward output layer:  h = (x * l_in) W + b

A targeted layer's output is rescaled element-wise; a layer also named in ``feedforward_modules`` has its input
rescaled instead (the paper's l_ff on the feed-forward activations). The vectors start at ones, so at
initialization the model equals the backbone exactly, and they are the fewest parameters of any method here: one
per output (or input) feature of each targeted layer.

Default targets, as Hugging Face peft's mapping for BERT (``key``, ``value``, ``output.dense``; the last matches
the attention output projection too, as there) and its OPT-style names for the small transformer (``key``,
``value``, ``fc2``); on a model without attention (MLP, conv4's convolutions) every linear layer but the input one,
outputs rescaled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from metapeft.backend import mx
from metapeft.errors import require
from metapeft.models.layers import affine
from metapeft.peft.base import PeftConfig, PeftMethod
from metapeft.peft.targets import matches, target_layers
from metapeft.registry import PEFT_METHODS
from metapeft.trees import Path, get_in, merge, path_name, paths_holding, set_in

# model class -> (target_modules, feedforward_modules) when the config leaves them null
DEFAULT_TARGETS = {
    "Transformer": (["key", "value", "fc2"], ["fc2"]),
    "HFEncoder": (["key", "value", "output.dense"], ["output.dense"]),
}
OTHER_MODELS = (["all-linear"], [])

SCALES_INPUT, SCALES_OUTPUT = "ia3_in", "ia3_out"


@dataclass
class IA3Config(PeftConfig):
    name: str = "ia3"
    target_modules: Optional[List[str]] = None  # null: the model's default (see the module's docstring)
    feedforward_modules: Optional[List[str]] = None  # targets whose input, not output, is rescaled; a subset


def ia3_linear(params: dict, x: mx.array) -> mx.array:
    if SCALES_INPUT in params:
        x = x * params[SCALES_INPUT]
    out = affine(params, x)
    return out * params[SCALES_OUTPUT] if SCALES_OUTPUT in params else out


@PEFT_METHODS.register("ia3", IA3Config)
class IA3(PeftMethod):
    hf_peft_type = "IA3"

    def __init__(self, cfg: IA3Config, model):
        super().__init__(cfg, model.with_linear(ia3_linear))
        targets, feedforward = DEFAULT_TARGETS.get(type(model).__name__, OTHER_MODELS)
        self.targets = list(cfg.target_modules if cfg.target_modules is not None else targets)
        # left null, the model's feed-forward defaults apply to those of the chosen targets that are among them
        self.feedforward = list(cfg.feedforward_modules) if cfg.feedforward_modules is not None else \
            [m for m in feedforward if m in self.targets]
        for module in self.feedforward:
            require(module in self.targets, "peft.feedforward_modules",
                    f"'{module}' is not among peft.target_modules {self.targets}; feed-forward modules are a subset")

    def check(self, backbone: dict) -> None:
        self.target_layers(backbone)

    def target_layers(self, backbone: dict) -> list[tuple[Path, dict, bool]]:
        """(path, layer, whether its input is rescaled) for every targeted layer."""
        chosen = target_layers(self.model, backbone, self.targets)
        return [(path, layer, any(matches(m, path, self.model.input_layer) for m in self.feedforward))
                for path, layer in chosen]

    def init_adapter(self, backbone: dict, key: mx.array, sample_inputs: mx.array) -> dict:
        adapter: dict = {}
        for path, layer, scales_input in self.target_layers(backbone):
            fan_in, fan_out = layer["weight"].shape
            set_in(adapter, path, {SCALES_INPUT: mx.ones((fan_in,))} if scales_input
                   else {SCALES_OUTPUT: mx.ones((fan_out,))})
        return adapter

    def scaled_layers(self, adapted: dict) -> list[tuple[Path, str]]:
        return [(p, SCALES_INPUT) for p in paths_holding(adapted, SCALES_INPUT)] + \
               [(p, SCALES_OUTPUT) for p in paths_holding(adapted, SCALES_OUTPUT)]

    def merged(self, adapted: dict, frozen: dict) -> dict:
        """x (diag(l_in) W) + b for input scaling; x (W diag(l_out)) + b l_out for output scaling."""
        updates: dict = {}
        for path, kind in self.scaled_layers(adapted):
            layer, scale = get_in(frozen, path), get_in(adapted, path)[kind]
            scaled = ({"weight": layer["weight"] * scale[:, None]} if kind == SCALES_INPUT
                      else {"weight": layer["weight"] * scale, **({"bias": layer["bias"] * scale} if "bias" in layer
                                                                  else {})})
            set_in(updates, path, scaled)
        return merge(self.learnable_backbone(frozen), updates)

    def hf_adapter_tensors(self, adapted: dict, frozen: dict, prefix: str) -> dict:
        """``ia3_l``: (out, 1) for output scaling, (1, in) for a feed-forward layer's input, as peft's IA3 Linear."""
        return {f"{prefix}{path_name(path)}.ia3_l": (get_in(adapted, path)[kind][None, :] if kind == SCALES_INPUT
                                                     else get_in(adapted, path)[kind][:, None])
                for path, kind in self.scaled_layers(adapted)}

    def hf_adapter_config(self, adapted: dict, num_iterations: int) -> dict:
        """Modules by their full names, so that peft's check (feed-forward modules are targets) holds as ours."""
        layers = self.scaled_layers(adapted)
        return {**self.hf_layer_config([path_name(p) for p, _ in layers]), "init_ia3_weights": True,
                "feedforward_modules": sorted(path_name(p) for p, kind in layers if kind == SCALES_INPUT)}
