"""LoRA (Hu et al., 2021): a low-rank update added to frozen linear layers.

    h = x W + b + (alpha / r) * (dropout(x) A) B,    A: (in, r) random,  B: (r, out) zeros

B starts at zero, so at initialization the model equals the backbone exactly. Dropout acts only while adapting
(inner loops, in meta-training and at test time), never when predicting. Under ``mx.vmap`` over the task batch
MLX draws one dropout mask shared by the tasks of a batch; masks differ across examples, features and steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from metapeft.backend import mx
from metapeft.errors import require
from metapeft.models.layers import affine
from metapeft.peft.base import LowRankConfig, LowRankMethod
from metapeft.registry import PEFT_METHODS
from metapeft.trees import get_in, merge, path_name, paths_holding, set_in


@dataclass
class LoRAConfig(LowRankConfig):
    name: str = "lora"
    rank: int = 4
    dropout: float = 0.0  # on the LoRA branch's input, while adapting


@PEFT_METHODS.register("lora", LoRAConfig)
class LoRA(LowRankMethod):
    rank_key = "peft.rank"
    down_key = "lora_a"
    hf_peft_type = "LORA"

    def __init__(self, cfg: LoRAConfig, model):
        require(cfg.rank >= 1, "peft.rank", f"must be >= 1, got {cfg.rank}")
        require(0 <= cfg.dropout < 1, "peft.dropout", f"must be in [0, 1), got {cfg.dropout}")
        super().__init__(cfg, model)
        layer = self.adapted_linear()
        self.model = model.with_linear(layer)
        self.adapting_model = (model.with_linear(lambda p, x: layer(p, x, dropout=True)) if cfg.dropout
                               else self.model)

    def adapted_linear(self):
        """``(params, x, dropout=False) -> output`` of a targeted linear layer (dropout: on the branch's input)."""
        scale, keep = self.scale, 1.0 - self.cfg.dropout

        def lora_linear(params: dict, x: mx.array, dropout: bool = False) -> mx.array:
            out = affine(params, x)
            if "lora_a" in params:
                if dropout:
                    x = x * mx.random.bernoulli(keep, x.shape) / keep
                out = out + scale * ((x @ params["lora_a"]) @ params["lora_b"])
            return out

        return lora_linear

    def features(self, adapted: dict, frozen: dict, x: mx.array, train: bool = False) -> mx.array:
        return (self.adapting_model if train else self.model).features(merge(frozen, adapted), x)

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

    def low_rank_factors(self, adapted: dict, frozen: dict) -> dict[str, tuple]:
        return {path_name(path): (get_in(adapted, path)["lora_a"], mx.ones((self.cfg.rank,)),
                                  get_in(adapted, path)["lora_b"]) for path in paths_holding(adapted, "lora_a")}

    def hf_adapter_tensors(self, adapted: dict, frozen: dict, prefix: str) -> dict:
        """lora_A.weight (r, in) = A^T, lora_B.weight (out, r) = B^T; peft scales by lora_alpha / r, as ours."""
        tensors = {}
        for module, (down, _, up) in self.low_rank_factors(adapted, frozen).items():
            tensors[f"{prefix}{module}.lora_A.weight"] = down.T
            tensors[f"{prefix}{module}.lora_B.weight"] = up.T
        return tensors

    def hf_adapter_config(self, adapted: dict, num_iterations: int) -> dict:
        return {**self.hf_common_config(adapted), "r": self.cfg.rank, "init_lora_weights": True, "use_rslora": False}
