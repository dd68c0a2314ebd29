"""ResNet-12, the backbone of MetaOptNet (Lee et al., 2019) and RFS (Tian et al., 2020):

    4 x residual block [conv3x3 -> BN -> leaky ReLU -> conv3x3 -> BN -> leaky ReLU -> conv3x3 -> BN,
                        plus a shortcut conv1x1 -> BN; add; leaky ReLU (0.1); 2x2 max-pool]
    -> global average pool -> head                     (channels 64, 160, 320, 640)

Its convolutions are written as conv4's are (``metapeft.models.conv4``): a matrix product over patches, so that
the network differentiates twice under ``mx.vmap`` and every convolution is a linear layer that LoRA, DoRA, (IA)³
and BitFit can adapt (``target_modules`` names such as ``blocks.3.conv3``). Batch norm is transductive, as conv4's.
Unlike the reference code, each convolution has a bias (4,736 parameters at the default widths; batch norm makes
them redundant, and BitFit needs them): 12,429,056 parameters before the head, the reference's 12,424,320 plus
those (the papers round it to 12.4M). DropBlock is not implemented. RFS pools globally before its head, as here;
``model.pool=false`` flattens the last map instead (MetaOptNet).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List

from metapeft.backend import mx
from metapeft.errors import require
from metapeft.models.conv4 import batch_norm, max_pool_2x2, patches_3x3
from metapeft.models.layers import Backbone, init_linear
from metapeft.registry import MODELS


@dataclass
class ResNet12Config:
    name: str = "resnet12"
    channels: List[int] = field(default_factory=lambda: [64, 160, 320, 640])
    negative_slope: float = 0.1  # of the leaky ReLUs
    pool: bool = True  # global average pooling before the head (RFS); false: flatten the last feature map


def leaky_relu(x: mx.array, slope: float) -> mx.array:
    return mx.maximum(x, slope * x)


def init_norm(width: int) -> dict:
    return {"scale": mx.ones((width,)), "bias": mx.zeros((width,))}


@MODELS.register("resnet12", ResNet12Config)
class ResNet12(Backbone):
    input_layer = ("blocks", 0, "conv1")

    def __init__(self, cfg: ResNet12Config, input_shape: tuple[int, ...], output_dim: int):
        require(len(cfg.channels) >= 1 and min(cfg.channels) > 0, "model.channels",
                f"must list block widths > 0, got {list(cfg.channels)}")
        require(len(input_shape) in (2, 3), "model", f"resnet12 reads images (height, width[, channels]), but this "
                f"task's examples have shape {tuple(input_shape)}; use model=mlp or model=transformer")
        size = min(input_shape[:2]) >> len(cfg.channels)
        require(size >= 1, "model", f"resnet12 halves the image {len(cfg.channels)} times: it needs images at least "
                f"{2 ** len(cfg.channels)} pixels wide, got {tuple(input_shape[:2])}")
        self.cfg = cfg
        self.input_shape = tuple(input_shape)
        self.in_channels = input_shape[2] if len(input_shape) == 3 else 1
        self.out_shape = (input_shape[0] >> len(cfg.channels), input_shape[1] >> len(cfg.channels))
        self.feature_dim = cfg.channels[-1] * (1 if cfg.pool else math.prod(self.out_shape))
        self.output_dim = output_dim

    def init(self, key: mx.array) -> dict:
        widths = [self.in_channels, *self.cfg.channels]
        keys = iter(mx.random.split(key, 4 * len(self.cfg.channels) + 1))
        blocks = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            block = {}
            for i, fan_in in enumerate((9 * w_in, 9 * w_out, 9 * w_out), start=1):
                block[f"conv{i}"], block[f"norm{i}"] = init_linear(next(keys), fan_in, w_out), init_norm(w_out)
            block["shortcut"], block["shortcut_norm"] = init_linear(next(keys), w_in, w_out), init_norm(w_out)
            blocks.append(block)
        return {"blocks": blocks, "head": init_linear(next(keys), self.feature_dim, self.output_dim)}

    def block(self, params: dict, h: mx.array) -> mx.array:
        slope = self.cfg.negative_slope
        out = h
        for i in (1, 2, 3):
            out = batch_norm(params[f"norm{i}"], self.linear(params[f"conv{i}"], patches_3x3(out)))
            if i < 3:
                out = leaky_relu(out, slope)
        shortcut = batch_norm(params["shortcut_norm"], self.linear(params["shortcut"], h))
        return max_pool_2x2(leaky_relu(out + shortcut, slope))

    def features(self, params: dict, x: mx.array) -> mx.array:
        batch = x.shape[: x.ndim - len(self.input_shape)]
        h = x.reshape(-1, self.input_shape[0], self.input_shape[1], self.in_channels)  # one batch axis for BN
        for block in params["blocks"]:
            h = self.block(block, h)
        h = h.mean(axis=(1, 2)) if self.cfg.pool else h.reshape(h.shape[0], -1)
        return h.reshape(*batch, h.shape[-1])
