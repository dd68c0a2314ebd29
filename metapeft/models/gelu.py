"""BERT's exact GELU, x Phi(x), from products and one division, with its derivative given (``model=hf_encoder``,
``model=hf_vit``; ``metapeft/models/native_ops.py`` computes the same on metapeft's CPU kernels)."""
from __future__ import annotations

import math

from metapeft.backend import mx
from metapeft.models.given_derivative import GivenDerivative

# Abramowitz & Stegun 7.1.28: erf(x) = 1 - (1 + a1 x + ... + a6 x^6)^-16 for x >= 0, |error| <= 3e-7.
SQRT_HALF = 1.0 / math.sqrt(2.0)
ERF_COEFFICIENTS = (0.0705230784, 0.0422820123, 0.0092705272, 0.0001520143, 0.0002765672, 0.0000430638)


def erf_polynomial(a: mx.array) -> mx.array:
    """p(a) = 1 + a1 a + ... + a6 a^6 (Horner's scheme), so that erf(a) = 1 - p(a)^-16 for a >= 0."""
    c1, c2, c3, c4, c5, c6 = ERF_COEFFICIENTS
    return 1.0 + a * (c1 + a * (c2 + a * (c3 + a * (c4 + a * (c5 + a * c6)))))


def sixteenth_power(p: mx.array) -> mx.array:
    p2 = p * p
    p4 = p2 * p2
    p8 = p4 * p4
    return p8 * p8


def erf_parts(x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """a = |x| clamped at 6, p(a) and p(a)^16, as GELU's derivative needs them. The clamp (erf(6) = 1 - 2e-17)
    keeps the 16th power and its derivatives finite."""
    a = mx.minimum(mx.abs(x), 6.0)
    p = erf_polynomial(a)
    return a, p, sixteenth_power(p)


def gelu_forward(x: mx.array) -> mx.array:
    """x Phi(x) = (x + |x| erf(|x| / sqrt 2)) / 2, with erf(a) = 1 - 1 / p(a)^16 (|error| < 3e-7).

    Written so that MLX fuses it into fewer kernels: the form it replaces, 0.5 x (1 + sign(x) erf(|x| / sqrt 2))
    with |x| clamped, took four fused kernels, each writing an activation-sized array the next one reads; this
    takes three, and equals it within float32 rounding (tested). ``python -m benchmarks.encoder ops mlx``, GELU on
    a (975, 1536) activation: 3.2 and 3.5 ms against 5.1 and 4.5 ms (alternating runs). Unclamped: past
    |x| = 6 sqrt 2, 1 / p^16 < 3e-16, and where p^16 overflows its reciprocal is the limit, 0."""
    return 0.5 * (x + mx.abs(x) * (1.0 - 1.0 / sixteenth_power(erf_polynomial(mx.abs(x * SQRT_HALF)))))


def gelu_slope(x: mx.array) -> mx.array:
    """The derivative of GELU as computed here: with u = x / sqrt 2 and erf(u) = sign(u) (1 - p(|u|)^-16),
    0.5 (1 + erf(u)) + 0.5 x erf'(u) / sqrt 2, with erf' = 16 p(a)^-17 p'(a) below the clamp at |u| = 6 and 0
    above it (where the forward's own slope differs from this by less than 1e-13). ``erf_parts`` is computed once
    for both terms."""
    u = x * SQRT_HALF
    a, p, p16 = erf_parts(u)
    c1, c2, c3, c4, c5, c6 = ERF_COEFFICIENTS
    p_slope = c1 + a * (2 * c2 + a * (3 * c3 + a * (4 * c4 + a * (5 * c5 + a * (6 * c6)))))
    erf_u = mx.sign(u) * (1.0 - 1.0 / p16)
    erf_slope = mx.where(mx.abs(u) < 6.0, 16.0 * p_slope / (p16 * p), 0.0)
    return 0.5 * (1.0 + erf_u) + 0.5 * SQRT_HALF * x * erf_slope


gelu = GivenDerivative(gelu_forward, gelu_slope)
gelu.__doc__ = """BERT's exact GELU (``hidden_act: gelu``), x * Phi(x), with erf from products and one division
(``gelu_forward``; |error| < 2e-6 in float32): MLX's CPU ``erf`` and ``exp`` cost 15x more than this on a
(1600, 1536) activation (120 ms against 7 ms; docs/performance.md, "The encoder: transcendental functions").

Its derivative is given (``gelu_slope``) rather than traced: traced, the backward pass reads every intermediate
array of the polynomial (17 the size of the activation, in MLX's fused kernels); given, it reads x alone
(``python -m benchmarks encoder-ops``, GELU and its gradient). It is the same function's derivative, to float64
rounding, first and second order (tested), so MAML's second-order meta-gradient is unchanged."""
