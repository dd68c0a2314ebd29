"""Prefix tuning (Li & Liang, 2021): learned keys and values prepended in every attention layer.

    attention_l(x) = softmax(q [P_k,l ; k(x)]^T / sqrt(d)) [P_v,l ; v(x)]      P_k,l, P_v,l: (num_virtual_tokens, width)

The backbone is untouched; every token of the input also attends to the prefix, which is left out of the output.
There is no start that reproduces the backbone (the softmax always gives the prefix some weight). It starts from the
keys and values that the backbone computes for tokens sampled from the meta-training data (``init: sampled``, the
paper's "activations of real words"), or from N(0, ``init_std``^2) (``init: random``). Without the paper's MLP
reparameterization (Hugging Face peft's ``prefix_projection: false``). On ``model=hf_encoder`` the virtual tokens
shift the input's positions by ``num_virtual_tokens``, as Hugging Face's past key values do, so an exported prefix
reproduces the adapted model in ``peft``.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from metapeft.backend import mx
from metapeft.errors import require
from metapeft.peft.base import PeftConfig, PeftMethod
from metapeft.registry import PEFT_METHODS


class PrefixInit(StrEnum):
    sampled = "sampled"  # keys and values of input tokens sampled from the meta-training data
    random = "random"  # N(0, init_std^2)


@dataclass
class PrefixTuningConfig(PeftConfig):
    name: str = "prefix_tuning"
    num_virtual_tokens: int = 4
    init: PrefixInit = PrefixInit.sampled
    init_std: float = 0.02  # init=random only


@PEFT_METHODS.register("prefix_tuning", PrefixTuningConfig)
class PrefixTuning(PeftMethod):
    hf_peft_type = "PREFIX_TUNING"

    def __init__(self, cfg: PrefixTuningConfig, model):
        require(cfg.num_virtual_tokens >= 1, "peft.num_virtual_tokens", f"must be >= 1, got {cfg.num_virtual_tokens}")
        require(model.supports_prefixes, "model",
                f"prefix tuning prepends keys and values in attention layers, which {type(model).__name__} does not "
                "have; use model=transformer, model=hf_encoder or model=hf_vit")
        positions = getattr(model, "num_positions", None)
        if positions is not None:
            require(model.cfg.max_length + cfg.num_virtual_tokens <= positions, "peft.num_virtual_tokens",
                    f"the virtual tokens shift the input's positions: model.max_length ({model.cfg.max_length}) + "
                    f"num_virtual_tokens must be <= {positions}, got {cfg.num_virtual_tokens}")
        super().__init__(cfg, model)

    def init_adapter(self, backbone: dict, key: mx.array, sample_inputs: mx.array) -> dict:
        """``prefix``: (layers, 2, num_virtual_tokens, width), keys at [:, 0] and values at [:, 1]."""
        n = self.cfg.num_virtual_tokens
        per_layer = self.model.token_keys_values(backbone, sample_inputs[:64])  # enough tokens to draw from
        if self.cfg.init == PrefixInit.random:
            shape = (len(per_layer), 2, n, per_layer[0][0].shape[-1])
            return {"prefix": self.cfg.init_std * mx.random.normal(shape, key=key)}
        picks = mx.random.randint(0, per_layer[0][0].shape[0], (n,), key=key)
        return {"prefix": mx.stack([mx.stack([keys[picks], values[picks]]) for keys, values in per_layer])}

    def features(self, adapted: dict, frozen: dict, x: mx.array, train: bool = False) -> mx.array:
        return self.model.features(frozen, x, prefix=adapted["prefix"])

    def hf_adapter_tensors(self, adapted: dict, frozen: dict, prefix: str) -> dict:
        """``prompt_embeddings`` (n, layers * 2 * width): each virtual token's keys and values, layer by layer (peft
        views it as (n, layers * 2, heads, head_dim))."""
        layers, _, n, width = adapted["prefix"].shape
        return {"prompt_embeddings": adapted["prefix"].transpose(2, 0, 1, 3).reshape(n, layers * 2 * width)}

    def hf_adapter_config(self, adapted: dict, num_iterations: int) -> dict:
        """A language model's prefix is peft's ``CAUSAL_LM`` one, its keys and values as wide as the key-value
        heads (grouped-query attention has fewer of them), as peft sets ``token_dim`` there."""
        layers, _, n, width = adapted["prefix"].shape
        heads = getattr(self.model, "num_kv_heads", self.model.num_heads)
        return {"task_type": getattr(self.model, "hf_task_type", "FEATURE_EXTRACTION"), "num_virtual_tokens": n,
                "token_dim": width, "num_transformer_submodules": 1, "num_attention_heads": heads,
                "num_layers": layers, "encoder_hidden_size": width, "prefix_projection": False,
                "modules_to_save": None}
