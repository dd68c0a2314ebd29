"""Layer norm, softmax and GELU on metapeft's vectorized CPU kernels (``metapeft.native``), differentiable to any
order and vmappable, for the pretrained transformers (``model.kernels``).

Each function is an ``mx.custom_function`` around a kernel, in a chain of three:

- its first derivative is a backward kernel (``layer_norm_backward``, ``softmax_backward``, ``gelu_backward``), and
  the backward kernel's derivative is a kernel too (``layer_norm_second``, ``softmax_second``, ``gelu_second``), so
  MAML's first and second derivatives both run on kernels;
- the third derivative (which no algorithm here takes) is the second kernel's traced through the same backward pass
  written in MLX operations, so it is still right (tested);
- its vmap moves the mapped axis off the last one (the kernels' rows) and calls the kernel once; a layer norm's
  backward passes, whose scale gradients are sums over rows, are mapped entry by entry, and where a layer norm's
  scale or bias is mapped (a meta-batch of full fine-tunings) its forward is MLX's operations.

Both vmap and grad keep the kernels: ``mx.custom_function``'s default vmap would map the forward and drop the given
derivative under ``grad(vmap(f))``. The kernels compute the same arithmetic as the MLX forms they replace
(``mx.fast.layer_norm``, ``softmax.softmax``, ``gelu.gelu``), equal to them within float32 rounding, first and
second derivatives included (tests/test_native.py).
"""
from __future__ import annotations

from enum import StrEnum
from functools import cache
from typing import Callable, NamedTuple

from metapeft import native
from metapeft.backend import mx
from metapeft.errors import ConfigError
from metapeft.models.gelu import gelu_slope
from metapeft.models.softmax import softmax as polynomial_softmax


class KernelKind(StrEnum):
    auto = "auto"  # native where the kernels build and MLX runs on the CPU, else mlx
    native = "native"  # metapeft.native's kernels; an error where they cannot be built
    mlx = "mlx"  # MLX's operations (how runs computed these before the kernels: to reproduce them to the digit)


class TransformerOps(NamedTuple):
    layer_norm: Callable  # (x, scale, bias, eps) -> normalized over the last axis
    softmax: Callable  # x -> softmax over the last axis
    gelu: Callable  # x -> BERT's exact GELU
    kernels: str  # "native" or "mlx": what was chosen


def transformer_ops(kind: KernelKind, mlx_softmax: Callable, mlx_gelu: Callable) -> TransformerOps:
    """The ops ``model.kernels`` names; ``mlx_softmax`` and ``mlx_gelu`` are the model's MLX forms. The softmax stays
    ``mlx_softmax`` when that is ``mx.softmax`` (``model.softmax=mlx``, which reproduces earlier runs)."""
    kind = KernelKind(kind)
    on_cpu = mx.default_device() == mx.cpu
    if kind == KernelKind.native and not on_cpu:
        raise ConfigError("model.kernels", "native: metapeft's kernels run on the CPU only, and MLX's default device "
                          "here is the GPU; valid: auto (the kernels on the CPU, MLX's operations on the GPU), mlx")
    use_native = kind == KernelKind.native or (kind == KernelKind.auto and on_cpu)
    if use_native and native.module() is None:
        if kind == KernelKind.native:
            raise ConfigError("model.kernels", f"native: metapeft's CPU kernels are unavailable here "
                              f"({native.status().get('reason', 'not built')}); valid: auto (falls back to MLX), mlx")
        use_native = False
    if not use_native:
        return TransformerOps(mlx_layer_norm, mlx_softmax, mlx_gelu, "mlx")
    return TransformerOps(layer_norm, softmax if mlx_softmax is polynomial_softmax else mlx_softmax, gelu, "native")


def mlx_layer_norm(x: mx.array, scale: mx.array, bias: mx.array, eps: float) -> mx.array:
    return mx.fast.layer_norm(x, scale, bias, eps)


def _to_front(x: mx.array, axis, size: int) -> mx.array:
    """x with its mapped axis first (broadcast to ``size`` where it has none)."""
    return mx.broadcast_to(x, (size, *x.shape)) if axis is None else mx.moveaxis(x, axis, 0)


def _mapped_size(inputs, axes) -> int:
    return next(x.shape[a] for x, a in zip(inputs, axes) if a is not None)


def _row_wise_vmap(function: Callable) -> Callable:
    """The vmap rule of a function of same-shaped arrays that works along their last axis: the mapped axis first."""
    def vmap(inputs, axes):
        size = _mapped_size(inputs, axes)
        outputs = function(*(_to_front(x, a, size) for x, a in zip(inputs, axes)))
        return outputs, (tuple(0 for _ in outputs) if isinstance(outputs, tuple) else 0)
    return vmap


def _per_entry_vmap(function: Callable) -> Callable:
    """The vmap rule of a function whose outputs include sums over rows (a layer norm's scale gradient): one call a
    mapped entry, stacked (a meta-batch has a few)."""
    def vmap(inputs, axes):
        size = _mapped_size(inputs, axes)
        entries = [function(*(x if a is None else mx.take(x, i, axis=a) for x, a in zip(inputs, axes)))
                   for i in range(size)]
        return tuple(mx.stack(outputs) for outputs in zip(*entries)), tuple(0 for _ in entries[0])
    return vmap


def _kernel_function(kernel: Callable, vjp: Callable, vmap_rule: Callable = _row_wise_vmap) -> Callable:
    """``kernel`` as an ``mx.custom_function`` with the given ``vjp`` and the vmap rule ``vmap_rule(function)``."""
    function = mx.custom_function(lambda *inputs: kernel(*inputs))
    function.vjp(vjp)
    function.vmap(vmap_rule(function))
    return function


def _traced_vjp(traced: Callable) -> Callable:
    """The vjp of ``traced`` (a kernel's computation in MLX operations) as autodiff computes it: the derivative of a
    second-derivative kernel, so that the third derivatives MAML never takes are still right."""
    return lambda primals, cotangents, outputs: mx.vjp(traced, _as_list(primals), _as_list(cotangents))[1]


def _as_list(arrays) -> list:
    return list(arrays) if isinstance(arrays, (list, tuple)) else [arrays]


# ---------------------------------------------------------------------------------------------------------------
# GELU: gelu -> gelu_backward -> gelu_second (kernels) -> traced


@cache
def _gelu_functions():
    kernels = native.required()
    backward_traced = lambda x, g: g * gelu_slope(x)
    second = _kernel_function(kernels.gelu_second,
                              _traced_vjp(lambda x, g, c: tuple(mx.vjp(backward_traced, [x, g], [c])[1])))
    backward = _kernel_function(kernels.gelu_backward, lambda primals, c, output: tuple(second(*primals, c)))
    # element-wise: any mapped axis is fine
    return _kernel_function(kernels.gelu, lambda x, c, output: backward(x, c),
                            lambda gelu: lambda x, axis: (gelu(x), axis))


def gelu(x: mx.array) -> mx.array:
    """``gelu.gelu`` on the kernels."""
    return _gelu_functions()(x)


# ---------------------------------------------------------------------------------------------------------------
# Softmax over the last axis: softmax -> softmax_backward -> softmax_second (kernels) -> traced


@cache
def _softmax_functions():
    kernels = native.required()
    backward_traced = lambda y, g: y * (g - (g * y).sum(axis=-1, keepdims=True))
    second = _kernel_function(kernels.softmax_second,
                              _traced_vjp(lambda y, g, c: tuple(mx.vjp(backward_traced, [y, g], [c])[1])))
    backward = _kernel_function(kernels.softmax_backward, lambda primals, c, result: tuple(second(*primals, c)))
    # the rows are the last axis: a mapped last axis is moved first
    return _kernel_function(kernels.softmax, lambda x, c, output: backward(output, c),
                            lambda softmax: lambda x, axis: ((softmax(mx.moveaxis(x, axis, 0)), 0)
                                                             if axis == x.ndim - 1 else (softmax(x), axis)))


def softmax(x: mx.array) -> mx.array:
    """``softmax.softmax`` (the polynomial exp) over the last axis, on the kernels."""
    return _softmax_functions()(x)


# ---------------------------------------------------------------------------------------------------------------
# Layer norm over the last axis: layer_norm -> layer_norm_backward -> layer_norm_second (kernels) -> traced


@cache
def _layer_norm_functions(eps: float):
    kernels = native.required()

    def backward_traced(x, scale, cotangent):
        return tuple(mx.vjp(lambda x, s, b: mx.fast.layer_norm(x, s, b, eps), [x, scale, mx.zeros_like(scale)],
                            [cotangent])[1])

    def second_traced(x, scale, g, c, c_scale, c_bias):  # in the kernel's order: the gradients of x, g and scale
        grad_x, grad_scale, grad_g = mx.vjp(backward_traced, [x, scale, g], [c, c_scale, c_bias])[1]
        return grad_x, grad_g, grad_scale

    second = _kernel_function(lambda *a: tuple(kernels.layer_norm_second(*a, eps)), _traced_vjp(second_traced),
                              _per_entry_vmap)

    def backward_vjp(primals, cotangents, outputs):
        grad_x, grad_g, grad_scale = second(*primals, *cotangents)
        return grad_x, grad_scale, grad_g

    backward = _kernel_function(lambda *a: tuple(kernels.layer_norm_backward(*a, eps)), backward_vjp,
                                _per_entry_vmap)

    def vmap_rule(layer_norm):
        def vmap(inputs, axes):
            x, scale, bias = inputs
            size = _mapped_size(inputs, axes)
            if axes[1] is None and axes[2] is None:  # shared scale and bias: the mapped axis is more rows
                return layer_norm(_to_front(x, axes[0], size), scale, bias), 0
            x = _to_front(x, axes[0], size)
            row = (size,) + (1,) * (x.ndim - 2) + (x.shape[-1],)
            scale, bias = (_to_front(t, a, size).reshape(row) for t, a in ((scale, axes[1]), (bias, axes[2])))
            return mx.fast.layer_norm(x, None, None, eps) * scale + bias, 0
        return vmap

    return _kernel_function(lambda x, scale, bias: kernels.layer_norm(x, scale, bias, eps),
                            lambda primals, c, output: backward(primals[0], primals[1], c), vmap_rule)


def layer_norm(x: mx.array, scale: mx.array, bias: mx.array, eps: float) -> mx.array:
    """``mx.fast.layer_norm`` over the last axis, on the kernels."""
    return _layer_norm_functions(float(eps))(x, scale, bias)
