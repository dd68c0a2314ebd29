"""A single linear map, x -> x W + b, with no head of its own: the model of linear multi-task theory.

The map is the backbone (LoRA adapts it: ``peft.target_modules`` ``all-linear`` or ``map``) and its output is the
prediction, so a task's whole adaptation is the PEFT method's: the setting of Block et al. (2025), where a rank-k
LoRA on the map is all a new task gets (``task=low_rank``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from metapeft.backend import mx
from metapeft.models.layers import Backbone, LinearInit, init_linear
from metapeft.registry import MODELS


@dataclass
class LinearConfig:
    name: str = "linear"
    init: LinearInit = LinearInit.pytorch


@MODELS.register("linear", LinearConfig)
class Linear(Backbone):
    input_layer = (None,)  # no path starts with it: the one layer reads the input and is LoRA's all-linear target

    def __init__(self, cfg: LinearConfig, input_shape: tuple[int, ...], output_dim: int):
        self.input_shape = tuple(input_shape)
        self.sizes = (math.prod(input_shape), output_dim)
        self.init_scheme = cfg.init

    def init(self, key: mx.array) -> dict:
        return {"map": init_linear(key, *self.sizes, self.init_scheme), "head": {}}

    def features(self, params: dict, x: mx.array) -> mx.array:
        return self.linear(params["map"], x.reshape(*x.shape[: x.ndim - len(self.input_shape)], -1))

    def head_output(self, head: dict, features: mx.array) -> mx.array:
        return features  # no head: the map's output is the prediction
