"""Prompt tuning (Lester et al., 2021): learned vectors prepended to the embedded input sequence.

The backbone is untouched; the prompts act on the input tokens only through attention. Initialized at random
(``init: random``) or from the embeddings of input tokens sampled from the meta-training data (``init: sampled``).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from metapeft.backend import mx
from metapeft.errors import require
from metapeft.peft.base import PeftConfig, PeftMethod
from metapeft.registry import PEFT_METHODS


class PromptInit(StrEnum):
    random = "random"
    sampled = "sampled"  # embeddings of input tokens sampled from the meta-training data


@dataclass
class PromptTuningConfig(PeftConfig):
    name: str = "prompt_tuning"
    num_virtual_tokens: int = 4
    init: PromptInit = PromptInit.sampled


@PEFT_METHODS.register("prompt_tuning", PromptTuningConfig)
class PromptTuning(PeftMethod):
    def __init__(self, cfg: PromptTuningConfig, model):
        require(cfg.num_virtual_tokens >= 1, "peft.num_virtual_tokens", f"must be >= 1, got {cfg.num_virtual_tokens}")
        require(model.supports_prompts, "model",
                f"prompt tuning prepends tokens, which {type(model).__name__} does not read; use model=transformer or "
                "model=hf_encoder")
        super().__init__(cfg, model)

    def init_adapter(self, backbone: dict, key: mx.array, sample_inputs: mx.array) -> dict:
        n = self.cfg.num_virtual_tokens
        if self.cfg.init == PromptInit.random:
            return {"prompt": 0.02 * mx.random.normal((n, self.model.width), key=key)}
        tokens = self.model.token_embeddings(backbone, sample_inputs)
        picks = mx.random.randint(0, tokens.shape[0], (n,), key=key)
        return {"prompt": tokens[picks]}

    def features(self, adapted: dict, frozen: dict, x: mx.array, train: bool = False) -> mx.array:
        return self.model.features(frozen, x, prompt=adapted["prompt"])
