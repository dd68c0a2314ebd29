"""Layers shared by the backbones, as pure functions over parameter dicts."""
from __future__ import annotations

import math
from enum import StrEnum

from metapeft.backend import mx


def affine(params: dict, x: mx.array) -> mx.array:
    """The plain linear layer, its bias optional (Llama's have none). PEFT methods that change linear layers
    substitute their own (see ``Backbone``)."""
    out = x @ params["weight"]
    return out + params["bias"] if "bias" in params else out


class LinearInit(StrEnum):
    pytorch = "pytorch"  # weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default
    maml_reference = "maml_reference"  # weights N(0, 0.01^2) truncated at 2 sd, as MAML's TensorFlow code


def init_linear(key: mx.array, fan_in: int, fan_out: int, scheme: LinearInit = LinearInit.pytorch) -> dict:
    """A linear layer's weights by ``scheme``; zero biases in both."""
    if scheme == LinearInit.maml_reference:
        weight = 0.01 * mx.random.truncated_normal(-2.0, 2.0, (fan_in, fan_out), key=key)
    else:
        bound = 1.0 / math.sqrt(fan_in)
        weight = mx.random.uniform(-bound, bound, (fan_in, fan_out), key=key)
    return {"weight": weight, "bias": mx.zeros((fan_out,))}


def with_prefix(prefix: tuple | None, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
    """Attention's keys and values (..., length, width) with ``prefix`` = (keys, values), each (n, width), put before
    them (prefix tuning); unchanged without one."""
    if prefix is None:
        return keys, values
    return tuple(mx.concatenate([mx.broadcast_to(p, (*t.shape[:-2], *p.shape)), t], axis=-2)
                 for p, t in zip(prefix, (keys, values)))


def layer_norm(params: dict, x: mx.array, eps: float = 1e-5) -> mx.array:
    return mx.fast.layer_norm(x, params["scale"], params["bias"], eps)


def init_layer_norm(size: int) -> dict:
    return {"scale": mx.ones((size,)), "bias": mx.zeros((size,))}


class Backbone:
    """Base of the models: ``init(key) -> params`` and ``model(params, x) -> predictions``.

    Every model keeps its task head, a linear layer over ``features``, at ``params["head"]`` and calls
    ``self.linear`` for each linear layer, so a PEFT
    method can run the same model with adapted linear layers through ``with_linear`` without knowing its layout.
    """

    linear = staticmethod(affine)
    supports_prompts = False  # features(..., prompt=) prepends vectors to the input tokens
    supports_prefixes = False  # features(..., prefix=) prepends keys and values in every attention layer
    input_layer: tuple = ()  # path of the layer reading the raw input (PEFT's "all-linear" leaves it out)

    def with_linear(self, linear) -> Backbone:
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.linear = linear
        return clone

    def init(self, key: mx.array) -> dict:
        raise NotImplementedError

    def features(self, params: dict, x: mx.array, **kwargs) -> mx.array:
        """The embedding the head reads: everything but the head (prototypes and linear probes use it)."""
        raise NotImplementedError

    def head_output(self, head: dict, features: mx.array) -> mx.array:
        """The prediction from the features: the head, a linear layer (a model without one overrides this)."""
        return self.linear(head, features)

    def __call__(self, params: dict, x: mx.array, **kwargs) -> mx.array:
        return self.head_output(params.get("head", {}), self.features(params, x, **kwargs))
