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
from metapeft.models.given_derivative import GivenDerivative


class SoftmaxKind(StrEnum):
    polynomial = "polynomial"  # ``softmax`` below
    mlx = "mlx"  # ``mx.softmax``: how runs computed attention before this module (to reproduce them to the digit)

LOG2_E = 1.4426950408889634
LN2_HIGH, LN2_LOW = 0.693145751953125, 1.428606765330187e-06  # ln 2 = HIGH + LOW; HIGH has 12 significant bits
TAYLOR = (1.0, 1.0, 1 / 2, 1 / 6, 1 / 24, 1 / 120, 1 / 720)  # e^r = sum r^k / k!, k <= 6
SMALLEST_EXPONENT = -87.0  # e^-87 = 1.6e-38, just above float32's smallest normal number


def nearest_integer(t: mx.array) -> mx.array:
    """t rounded to the nearest integer, from a sum and a difference: (t + 1.5 * 2^p) - 1.5 * 2^p, where the float
    has p fraction bits and |t| < 2^(p-1), since the sum's spacing is 1. ``mx.floor`` is a libm call an element in
    MLX's compiled CPU kernels; it is used for other dtypes."""
    fraction_bits = {mx.float32: 23, mx.float64: 52}.get(t.dtype)
    if fraction_bits is None:
        return mx.floor(t + 0.5)
    rounding = 1.5 * 2**fraction_bits
    return (t + rounding) - rounding


def reduced(x: mx.array) -> tuple[mx.array, mx.array]:
    """n, r with max(x, -87) = n ln 2 + r, |r| <= ln 2 / 2, n an integer (as a float)."""
    x = mx.maximum(x, SMALLEST_EXPONENT)
    n = mx.stop_gradient(nearest_integer(x * LOG2_E))
    return n, (x - n * LN2_HIGH) - n * LN2_LOW


def taylor(r: mx.array, degree: int) -> mx.array:
    """sum r^k / k! for k <= degree, Horner's scheme."""
    polynomial = TAYLOR[degree]
    for coefficient in reversed(TAYLOR[:degree]):
        polynomial = polynomial * r + coefficient
    return polynomial


def power_of_two(n: mx.array) -> mx.array:
    """2^n for an integer n in [-126, 127], written into a float32's exponent bits; no derivative (a view has none
    in MLX; 2^n is piecewise constant)."""
    return mx.stop_gradient(mx.view(mx.left_shift(n.astype(mx.int32) + 127, 23), mx.float32))


def exp_slope(x: mx.array) -> mx.array:
    """The derivative of ``exp_nonpositive``: d/dx of taylor(r, 6) 2^n is taylor(r, 5) 2^n (dr/dx = 1, n constant),
    and 0 where x was clamped."""
    n, r = reduced(x)
    return mx.where(x > SMALLEST_EXPONENT, taylor(r, 5) * power_of_two(n), 0.0)


def exp_polynomial(x: mx.array) -> mx.array:
    """taylor(r, 6) 2^n with x = n ln 2 + r: e^x from products (the forward of ``exp_nonpositive``); 0 below -87."""
    n, r = reduced(x)
    return mx.where(x < SMALLEST_EXPONENT, 0.0, taylor(r, 6) * power_of_two(n))


exp_nonpositive = GivenDerivative(exp_polynomial, exp_slope)
exp_nonpositive.__doc__ = """e^x for x <= 0 (what softmax needs after subtracting the maximum); below -87 it is
0, as e^x in float32 is below -103.9. So no masked key's probability is a subnormal number (e^-87 / sum), which
every later product with it, forward and backward, pays for on x86-64: on an Intel Xeon the encoder's FOMAML step
took 237 s an iteration with e^-87 here and 7.9 to 9.1 s with 0 (docs/performance.md). Its derivative is given
(``exp_slope``), as GELU's is: traced, the backward pass reads the polynomial's intermediate arrays; given, it reads
x alone. It is the derivative of this polynomial, not of e^x: first and second order equal to the traced ones to
float64 rounding (tested)."""


def attention_softmax(kind: SoftmaxKind):
    """The softmax over the last axis that ``model.softmax`` names."""
    return softmax if kind == SoftmaxKind.polynomial else lambda x: mx.softmax(x, axis=-1)


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis, with ``exp_nonpositive``. The maximum is subtracted without its gradient: softmax
    does not change when every input moves by the same amount, so the derivatives are the same."""
    exponentials = exp_nonpositive(x - mx.stop_gradient(x.max(axis=-1, keepdims=True)))
    return exponentials / exponentials.sum(axis=-1, keepdims=True)
