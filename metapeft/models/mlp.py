"""A multilayer perceptron over flattened inputs; the MAML sinusoid network is ``hidden_sizes=[40, 40]``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import List

from metapeft.backend import mx
from metapeft.errors import require
from metapeft.models.layers import Backbone, LinearInit, init_linear
from metapeft.protocols import protocol_default
from metapeft.registry import MODELS


class Activation(StrEnum):
    relu = "relu"
    tanh = "tanh"


ACTIVATIONS = {Activation.relu: lambda x: mx.maximum(x, 0), Activation.tanh: lambda x: mx.tanh(x)}


@dataclass
class MLPConfig:
    name: str = "mlp"
    hidden_sizes: List[int] = field(default_factory=lambda: [40, 40])
    activation: Activation = Activation.relu
    init: LinearInit = protocol_default("model_init")  # type: ignore[assignment]


@MODELS.register("mlp", MLPConfig)
class MLP(Backbone):
    input_layer = ("hidden", 0)

    def __init__(self, cfg: MLPConfig, input_shape: tuple[int, ...], output_dim: int):
        # the features a linear probe, a prototype and the embeddings read are the last hidden layer's
        require(len(cfg.hidden_sizes) > 0, "model.hidden_sizes", "needs at least one hidden layer, e.g. [40, 40]")
        for size in cfg.hidden_sizes:
            require(size > 0, "model.hidden_sizes", f"every size must be > 0, got {list(cfg.hidden_sizes)}")
        self.input_shape = tuple(input_shape)
        self.sizes = [math.prod(input_shape), *cfg.hidden_sizes, output_dim]
        self.activation = ACTIVATIONS[cfg.activation]
        self.init_scheme = cfg.init

    def init(self, key: mx.array) -> dict:
        keys = mx.random.split(key, len(self.sizes) - 1)
        layers = [init_linear(k, a, b, self.init_scheme) for k, a, b in zip(keys, self.sizes[:-1], self.sizes[1:])]
        return {"hidden": layers[:-1], "head": layers[-1]}

    def features(self, params: dict, x: mx.array) -> mx.array:
        h = x.reshape(*x.shape[: x.ndim - len(self.input_shape)], -1)
        for layer in params["hidden"]:
            h = self.activation(self.linear(layer, h))
        return h
