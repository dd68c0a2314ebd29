"""A multilayer perceptron over flattened inputs; the MAML sinusoid network is ``hidden_sizes=[40, 40]``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List

import mlx.core as mx

from metapeft.config import require
from metapeft.registry import MODELS

ACTIVATIONS = {"relu": lambda x: mx.maximum(x, 0), "tanh": mx.tanh}


@dataclass
class MLPConfig:
    name: str = "mlp"
    hidden_sizes: List[int] = field(default_factory=lambda: [40, 40])
    activation: str = "relu"


def linear(params: dict, x: mx.array) -> mx.array:
    return x @ params["weight"] + params["bias"]


def init_linear(key: mx.array, fan_in: int, fan_out: int) -> dict:
    """Weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as PyTorch's default; zero biases."""
    bound = 1.0 / math.sqrt(fan_in)
    return {"weight": mx.random.uniform(-bound, bound, (fan_in, fan_out), key=key), "bias": mx.zeros((fan_out,))}


@MODELS.register("mlp", MLPConfig)
class MLP:
    def __init__(self, cfg: MLPConfig, input_shape: tuple[int, ...], output_dim: int):
        for size in cfg.hidden_sizes:
            require(size > 0, "model.hidden_sizes", f"every size must be > 0, got {list(cfg.hidden_sizes)}")
        require(cfg.activation in ACTIVATIONS, "model.activation",
                f"unknown '{cfg.activation}'; valid: {sorted(ACTIVATIONS)}")
        self.input_shape = tuple(input_shape)
        self.sizes = [math.prod(input_shape), *cfg.hidden_sizes, output_dim]
        self.activation = ACTIVATIONS[cfg.activation]

    def init(self, key: mx.array) -> dict:
        keys = mx.random.split(key, len(self.sizes) - 1)
        return {"layers": [init_linear(k, a, b) for k, a, b in zip(keys, self.sizes[:-1], self.sizes[1:])]}

    def __call__(self, params: dict, x: mx.array) -> mx.array:
        h = x.reshape(*x.shape[: x.ndim - len(self.input_shape)], -1)
        *hidden, last = params["layers"]
        for layer in hidden:
            h = self.activation(linear(layer, h))
        return linear(last, h)
