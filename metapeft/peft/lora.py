"""LoRA (Hu et al., 2021): a low-rank update added to frozen linear layers.

    h = x W + b + (alpha / r) * (x A) B,    A: (in, r) random,  B: (r, out) zeros

B starts at zero, so at initialization the model equals the backbone exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from metapeft.config import require
from metapeft.models.layers import affine
from metapeft.peft.base import LowRankConfig, LowRankMethod
from metapeft.registry import PEFT_METHODS
from metapeft.trees import set_in


@dataclass
class LoRAConfig(LowRankConfig):
    name: str = "lora"
    rank: int = 4


@PEFT_METHODS.register("lora", LoRAConfig)
class LoRA(LowRankMethod):
    rank_key = "peft.rank"

    def __init__(self, cfg: LoRAConfig, model):
        require(cfg.rank >= 1, "peft.rank", f"must be >= 1, got {cfg.rank}")
        super().__init__(cfg, model)
        scale = cfg.alpha / cfg.rank

        def lora_linear(params: dict, x: mx.array) -> mx.array:
            out = affine(params, x)
            if "lora_a" in params:
                out = out + scale * ((x @ params["lora_a"]) @ params["lora_b"])
            return out

        self.model = model.with_linear(lora_linear)

    def init_adapter(self, backbone: dict, key: mx.array, sample_inputs: mx.array) -> dict:
        adapter: dict = {}
        layers = self.target_layers(backbone)
        for layer_key, (path, layer) in zip(mx.random.split(key, len(layers)), layers):
            fan_in, fan_out = layer["weight"].shape
            bound = 1.0 / math.sqrt(fan_in)
            set_in(adapter, path, {
                "lora_a": mx.random.uniform(-bound, bound, (fan_in, self.cfg.rank), key=layer_key),
                "lora_b": mx.zeros((self.cfg.rank, fan_out)),
            })
        return adapter
