"""DoRA (Liu et al., 2024): LoRA on the direction of each weight, plus a learned magnitude per output feature.

    W' = m * (W + s A B) / ||W + s A B||_c        h = x W' + b,    s = alpha / r

||.||_c is the norm of each output feature's column of weights. A and B start as LoRA's (B = 0) and m at ||W||_c,
so at initialization W' = W and the model equals the backbone exactly. The norm stays in the gradient (the paper's
section 4.3 and Hugging Face peft detach it to save memory during fine-tuning): the meta-gradient is that of the
function computed. Computed as m / ||W + s A B||_c * (x W + s (dropout(x) A) B) + b, so dropout acts on the
low-rank branch only, as in peft.
"""
from __future__ import annotations

from dataclasses import dataclass

from metapeft.backend import mx
from metapeft.models.layers import affine
from metapeft.peft.lora import LoRA, LoRAConfig
from metapeft.registry import PEFT_METHODS
from metapeft.trees import get_in, merge, path_name, paths_holding, set_in

MAGNITUDE = "dora_magnitude"


@dataclass
class DoRAConfig(LoRAConfig):
    name: str = "dora"


def column_norms(weight: mx.array) -> mx.array:
    """||W||_c of an (in, out) weight: one norm per output feature."""
    return mx.sqrt(mx.sum(mx.square(weight), axis=0))


@PEFT_METHODS.register("dora", DoRAConfig)
class DoRA(LoRA):
    def adapted_linear(self):
        scale, keep = self.scale, 1.0 - self.cfg.dropout

        def dora_linear(params: dict, x: mx.array, dropout: bool = False) -> mx.array:
            if MAGNITUDE not in params:
                return affine(params, x)
            update = scale * (params["lora_a"] @ params["lora_b"])
            magnitude_scale = params[MAGNITUDE] / column_norms(params["weight"] + update)
            branch_input = x * mx.random.bernoulli(keep, x.shape) / keep if dropout else x
            low_rank = scale * ((branch_input @ params["lora_a"]) @ params["lora_b"])
            out = magnitude_scale * (x @ params["weight"] + low_rank)
            return out + params["bias"] if "bias" in params else out

        return dora_linear

    def init_adapter(self, backbone: dict, key: mx.array, sample_inputs: mx.array) -> dict:
        adapter = super().init_adapter(backbone, key, sample_inputs)
        for path in paths_holding(adapter, "lora_a"):
            get_in(adapter, path)[MAGNITUDE] = column_norms(get_in(backbone, path)["weight"])
        return adapter

    def merged(self, adapted: dict, frozen: dict) -> dict:
        updates: dict = {}
        for path in paths_holding(adapted, MAGNITUDE):
            layer, weight = get_in(adapted, path), get_in(frozen, path)["weight"]
            direction = weight + self.scale * (layer["lora_a"] @ layer["lora_b"])
            set_in(updates, path, {"weight": direction * (layer[MAGNITUDE] / column_norms(direction))})
        return merge(self.learnable_backbone(frozen), updates)

    def hf_adapter_tensors(self, adapted: dict, frozen: dict, prefix: str) -> dict:
        """LoRA's tensors and ``lora_magnitude_vector`` (out,), as peft's LoRA with ``use_dora``."""
        tensors = super().hf_adapter_tensors(adapted, frozen, prefix)
        for path in paths_holding(adapted, MAGNITUDE):
            tensors[f"{prefix}{path_name(path)}.lora_magnitude_vector"] = get_in(adapted, path)[MAGNITUDE]
        return tensors

    def hf_adapter_config(self, adapted: dict, num_iterations: int) -> dict:
        return {**super().hf_adapter_config(adapted, num_iterations), "use_dora": True}
