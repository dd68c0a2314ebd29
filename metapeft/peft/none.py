"""No PEFT: every backbone parameter is adapted and meta-learned (the classic meta-learning setting)."""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from metapeft.registry import PEFT_METHODS


@dataclass
class NoPeftConfig:
    name: str = "none"


@PEFT_METHODS.register("none", NoPeftConfig)
class NoPeft:
    def __init__(self, cfg: NoPeftConfig, model):
        self.model = model

    def split(self, backbone_params: dict, key: mx.array) -> tuple[dict, dict]:
        """(adapted, frozen): here the whole model is adapted and nothing is frozen."""
        return backbone_params, {}

    def __call__(self, adapted: dict, frozen: dict, x: mx.array) -> mx.array:
        return self.model(adapted, x)
