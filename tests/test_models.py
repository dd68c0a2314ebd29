"""The backbones compute what their papers' layers compute."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from omegaconf import OmegaConf

from metapeft.models.conv4 import Conv4, Conv4Config, max_pool_2x2, patches_3x3


def test_a_patch_product_is_a_3x3_same_convolution():
    x = mx.random.normal((2, 7, 6, 3), key=mx.random.key(0))
    kernel = mx.random.normal((4, 3, 3, 3), key=mx.random.key(1))
    reference = mx.conv2d(x, kernel, padding=1)  # MLX's kernels: (out, height, width, in)
    as_matrix = kernel.transpose(1, 2, 3, 0).reshape(9 * 3, 4)  # rows ordered as patches_3x3's (dy, dx, channel)
    np.testing.assert_allclose(np.array(patches_3x3(x) @ as_matrix), np.array(reference), rtol=1e-4, atol=1e-5)


def test_max_pool_takes_each_2x2_maximum_and_drops_an_odd_edge():
    x = mx.arange(5 * 5, dtype=mx.float32).reshape(1, 5, 5, 1)
    assert np.array(max_pool_2x2(x))[0, :, :, 0].tolist() == [[6, 8], [16, 18]]


@pytest.mark.parametrize("shape, blocks, side", [((8, 8), 2, 2), ((28, 28), 4, 1), ((5, 5), 1, 2)])
def test_conv4_never_convolves_a_map_narrower_than_its_kernel(shape, blocks, side):
    model = Conv4(OmegaConf.structured(Conv4Config(channels=8)), shape, 5)
    params = model.init(mx.random.key(0))
    x = mx.random.normal((3, 6, *shape), key=mx.random.key(1))  # tasks x examples
    assert len(params["blocks"]) == blocks and model.feature_dim == 8 * side * side
    assert model(params, x).shape == (3, 6, 5)
    assert model.features(params, x).shape == (3, 6, model.feature_dim)
