"""No PEFT: every parameter of a randomly initialized model is adapted and meta-learned (classic meta-learning)."""
from __future__ import annotations

from dataclasses import dataclass

from metapeft.backend import mx
from metapeft.peft.base import PeftConfig, PeftMethod
from metapeft.registry import PEFT_METHODS


@dataclass
class NoPeftConfig(PeftConfig):
    name: str = "none"


@PEFT_METHODS.register("none", NoPeftConfig)
class NoPeft(PeftMethod):
    uses_pretrained_backbone = False

    def frozen(self, backbone: dict) -> dict:
        return {}

    def init_adapted(self, backbone: dict, key: mx.array, sample_inputs: mx.array) -> dict:
        return self.model.init(key)

    def features(self, adapted: dict, frozen: dict, x: mx.array, train: bool = False) -> mx.array:
        return self.model.features(adapted, x)
