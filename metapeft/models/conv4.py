"""The four-block convolutional network of the MAML (Finn et al., 2017) and ProtoNet (Snell et al., 2017) papers.

    4 x [3x3 convolution, `channels` filters -> batch norm -> ReLU -> 2x2 max-pool]  -> flatten -> head

Sized for the input: a block convolves only a feature map at least as wide as its 3x3 kernel, so ``blocks`` is a
maximum (28x28 images keep all four: 28 -> 14 -> 7 -> 3 -> 1; 8x8 digits keep two: 8 -> 4 -> 2, where a third
block would convolve a 2x2 map and a fourth a single pixel). Batch norm uses the statistics of the examples it is
given (transductive, with no running averages), as MAML's reference code does: a support set and a query set are
each normalized by their own statistics.

A convolution is written as a matrix product over 3x3 patches (``weight``: (9 * in_channels, out_channels)), so it
is a linear layer like any other: differentiable twice under ``mx.vmap`` (MLX's own conv2d is not, in 0.32: its
weight gradient has no vmap rule) and open to LoRA's ``target_modules``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from metapeft.backend import mx
from metapeft.errors import require
from metapeft.models.layers import Backbone, init_linear
from metapeft.registry import MODELS

KERNEL = 3


@dataclass
class Conv4Config:
    name: str = "conv4"
    channels: int = 64
    blocks: int = 4  # at most: blocks that would convolve a map narrower than the kernel are left out


def patches_3x3(h: mx.array) -> mx.array:
    """(..., H, W, C) -> (..., H, W, 9 C): each pixel's zero-padded 3x3 neighbourhood."""
    height, width = h.shape[-3], h.shape[-2]
    padded = mx.pad(h, [(0, 0)] * (h.ndim - 3) + [(1, 1), (1, 1), (0, 0)])
    return mx.concatenate([padded[..., i: i + height, j: j + width, :] for i in range(3) for j in range(3)], axis=-1)


def max_pool_2x2(h: mx.array) -> mx.array:
    """2x2 max-pooling, stride 2; an odd last row or column is dropped (floor, as PyTorch's MaxPool2d)."""
    height, width = h.shape[-3] // 2, h.shape[-2] // 2
    h = h[..., : 2 * height, : 2 * width, :]
    return h.reshape(*h.shape[:-3], height, 2, width, 2, h.shape[-1]).max(axis=(-4, -2))


def batch_norm(params: dict, h: mx.array, eps: float = 1e-5) -> mx.array:
    """Normalize each channel over the examples and pixels given (every axis but the channel's)."""
    axes = tuple(range(h.ndim - 1))
    mean = h.mean(axis=axes, keepdims=True)
    variance = mx.square(h - mean).mean(axis=axes, keepdims=True)
    return (h - mean) * mx.rsqrt(variance + eps) * params["scale"] + params["bias"]


@MODELS.register("conv4", Conv4Config)
class Conv4(Backbone):
    input_layer = ("blocks", 0, "conv")

    def __init__(self, cfg: Conv4Config, input_shape: tuple[int, ...], output_dim: int):
        require(cfg.channels > 0, "model.channels", f"must be > 0, got {cfg.channels}")
        require(cfg.blocks > 0, "model.blocks", f"must be > 0, got {cfg.blocks}")
        require(len(input_shape) in (2, 3), "model", f"conv4 reads images (height, width[, channels]), but this "
                f"task's examples have shape {tuple(input_shape)}; use model=mlp or model=transformer")
        self.cfg = cfg
        self.input_shape = tuple(input_shape)
        self.in_channels = input_shape[2] if len(input_shape) == 3 else 1
        size, self.num_blocks = min(input_shape[:2]), 0
        while self.num_blocks < cfg.blocks and size >= KERNEL:
            self.num_blocks, size = self.num_blocks + 1, size // 2
        require(self.num_blocks > 0, "model", f"conv4's {KERNEL}x{KERNEL} convolution needs images at least {KERNEL} "
                f"pixels wide, got {tuple(input_shape[:2])}; use model=mlp or model=transformer")
        self.feature_dim = cfg.channels * (input_shape[0] >> self.num_blocks) * (input_shape[1] >> self.num_blocks)
        self.output_dim = output_dim

    def init(self, key: mx.array) -> dict:
        keys = mx.random.split(key, self.num_blocks + 1)
        widths = [self.in_channels] + [self.cfg.channels] * self.num_blocks
        blocks = [{"conv": init_linear(keys[i], 9 * widths[i], widths[i + 1]),
                   "norm": {"scale": mx.ones((widths[i + 1],)), "bias": mx.zeros((widths[i + 1],))}}
                  for i in range(self.num_blocks)]
        return {"blocks": blocks, "head": init_linear(keys[-1], self.feature_dim, self.output_dim)}

    def features(self, params: dict, x: mx.array) -> mx.array:
        batch = x.shape[: x.ndim - len(self.input_shape)]
        h = x.reshape(-1, self.input_shape[0], self.input_shape[1], self.in_channels)  # one batch axis for BN
        for block in params["blocks"]:
            h = max_pool_2x2(mx.maximum(batch_norm(block["norm"], self.linear(block["conv"], patches_3x3(h))), 0))
        return h.reshape(*batch, math.prod(h.shape[1:]))
