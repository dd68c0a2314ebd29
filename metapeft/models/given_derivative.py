"""An element-wise function whose derivative is given rather than traced.

Traced, the backward pass of a polynomial approximation (``erf`` in GELU, ``exp`` in the attention softmax) reads
every intermediate array of its forward pass; given as a function of x, it reads x alone (docs/performance.md,
"Where the encoder's time goes"). The given derivative must be the forward's own derivative, so that results and
MAML's second derivatives stay the same: each use is tested against the traced one to float64 rounding.
"""
from __future__ import annotations

from typing import Callable, Optional

from metapeft.backend import mx


class GivenDerivative:
    """``forward(x)`` whose vector-Jacobian product is ``cotangent * slope(x)``. The ``mx.custom_function`` is made
    at the first call, so that importing a model loads no MLX."""

    def __init__(self, forward: Callable, slope: Callable):
        self.forward, self.slope = forward, slope
        self._function: Optional[Callable] = None

    def __call__(self, x: mx.array) -> mx.array:
        if self._function is None:
            function = mx.custom_function(self.forward)
            # a function of one array: MLX passes the array, its cotangent and the output themselves, not in tuples
            function.vjp(lambda primal, cotangent, output: cotangent * self.slope(primal))
            self._function = function
        return self._function(x)
