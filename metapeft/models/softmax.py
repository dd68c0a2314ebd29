"""Softmax from operations MLX's compiler fuses, for the pretrained transformers' attention (``hf_encoder``,
``hf_vit``).

MLX's CPU ``exp`` costs 15-30 ns an element on a single thread; the attention softmax of a MiniLM meta-step is a
third of its forward pass. ``exp`` is computed here the way libm computes it, from products: x = n ln 2 + r with
|r| <= ln 2 / 2 (Cody and Waite's two-part ln 2, so the reduction is exact to float32 rounding), e^r by its Taylor
polynomial of degree 6, and 2^n written straight into a float32's exponent bits. The relative error is below 3e-7
over [-87, 0] (float32's spacing is 1.2e-7; tested). The derivatives are the polynomial's: its derivative is the
Taylor polynomial of degree 5, within (ln 2 / 2)^6 / 6! = 2.4e-6 of e^r, so first and second derivatives match
``mx.softmax``'s to 1e-5 relative (tested: MAML differentiates twice through attention).
"""
from __future__ import annotations

from enum import StrEnum

from metapeft.backend import mx


class SoftmaxKind(StrEnum):
    polynomial = "polynomial"  # ``softmax`` below
    mlx = "mlx"  # ``mx.softmax``: how runs computed attention before this module (to reproduce them to the digit)

LOG2_E = 1.4426950408889634
LN2_HIGH, LN2_LOW = 0.693145751953125, 1.428606765330187e-06  # ln 2 = HIGH + LOW; HIGH has 12 significant bits
TAYLOR = (1.0, 1.0, 1 / 2, 1 / 6, 1 / 24, 1 / 120, 1 / 720)  # e^r = sum r^k / k!, k <= 6
SMALLEST_EXPONENT = -87.0  # e^-87 = 1.6e-38, just above float32's smallest normal number
# (t + 1.5 * 2^p) - 1.5 * 2^p is t rounded to the nearest integer when the float has p fraction bits and |t| < 2^(p-1):
# the sum's spacing is 1
ROUNDING = {mx.float32: 1.5 * 2**23, mx.float64: 1.5 * 2**52}


def nearest_integer(t: mx.array) -> mx.array:
    """t rounded to the nearest integer, from a sum and a difference: ``mx.floor`` is a libm call an element in
    MLX's compiled CPU kernels (where the rounding constant is unknown for the dtype, it is used all the same)."""
    if t.dtype not in ROUNDING:
        return mx.floor(t + 0.5)
    return (t + ROUNDING[t.dtype]) - ROUNDING[t.dtype]


def exp_nonpositive(x: mx.array) -> mx.array:
    """e^x for x <= 0 (what softmax needs after subtracting the maximum); below -87 it is e^-87, not 0."""
    x = mx.maximum(x, SMALLEST_EXPONENT)
    n = mx.stop_gradient(nearest_integer(x * LOG2_E))
    r = (x - n * LN2_HIGH) - n * LN2_LOW
    polynomial = TAYLOR[-1]
    for coefficient in reversed(TAYLOR[:-1]):
        polynomial = polynomial * r + coefficient
    two_to_the_n = mx.view(mx.left_shift(n.astype(mx.int32) + 127, 23), mx.float32)  # float32 bits of 2^n
    return polynomial * mx.stop_gradient(two_to_the_n)  # MLX has no derivative for a view; 2^n is piecewise constant


def attention_softmax(kind: SoftmaxKind):
    """The softmax over the last axis that ``model.softmax`` names."""
    return softmax if kind == SoftmaxKind.polynomial else lambda x: mx.softmax(x, axis=-1)


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis, with ``exp_nonpositive``. The maximum is subtracted without its gradient: softmax
    does not change when every input moves by the same amount, so the derivatives are the same."""
    exponentials = exp_nonpositive(x - mx.stop_gradient(x.max(axis=-1, keepdims=True)))
    return exponentials / exponentials.sum(axis=-1, keepdims=True)
