"""metapeft's vectorized CPU kernels (metapeft/native, metapeft/models/native_ops.py): each kernel equals the MLX
form it replaces, its first and second derivatives equal that form's, under vmap and grad in either order, in
compiled functions, and the encoder gives the same features and gradients with either."""
from __future__ import annotations

import sys

import mlx.core as mx
import mlx.utils
import numpy as np
import pytest

from metapeft import native
from metapeft.errors import ConfigError
from metapeft.models import native_ops
from metapeft.models.gelu import gelu as mlx_gelu
from metapeft.models.softmax import softmax as mlx_softmax

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernels are built on Linux")
EPS = 1e-12
rng = np.random.default_rng(0)


def array(*shape, scale=1.0):
    return mx.array(rng.normal(size=shape).astype(np.float32) * scale)


def mlx_layer_norm(x, scale, bias):
    return mx.fast.layer_norm(x, scale, bias, EPS)


def native_layer_norm(x, scale, bias):
    return native_ops.layer_norm(x, scale, bias, EPS)


def close(ours, theirs, relative=2e-6):
    """Equal within float32 rounding, relative to the largest magnitude (sums of a few hundred terms)."""
    ours, theirs = np.array(ours, np.float64), np.array(theirs, np.float64)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=relative * max(np.abs(theirs).max(), 1e-30), rtol=0)


# (native, MLX form, input shapes, the input scale): layer norm's scale and bias are its second and third inputs
PAIRS = {
    "gelu": (native_ops.gelu, mlx_gelu, [(6, 5, 48)], 3.0),
    "softmax": (native_ops.softmax, mlx_softmax, [(6, 5, 39)], 4.0),
    "layer_norm": (native_layer_norm, mlx_layer_norm, [(6, 5, 48), (48,), (48,)], 1.0),
}

# softmax's backward kernel is the softmax Jacobian at the computed output, y (g - <g, y>): its derivatives are
# mx.softmax's to float32 rounding (9e-7 relative at most in the test below), where those traced through the
# polynomial exp differ from mx.softmax's by up to 6e-5 (its derivative is e^r's Taylor polynomial of degree 5)
DERIVATIVE_REFERENCES = {"softmax": lambda s: mx.softmax(s, axis=-1)}


def test_the_kernels_build_and_load_on_linux():
    assert native.module() is not None, native.status()
    assert native.status()["available"] and native.status()["threads"] >= 1


@pytest.mark.parametrize("name", PAIRS)
def test_forward_equals_the_mlx_form(name):
    ours, theirs, shapes, scale = PAIRS[name]
    inputs = [array(*shape, scale=scale) for shape in shapes]
    close(ours(*inputs), theirs(*inputs))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("name", PAIRS)
def test_first_and_second_derivatives_equal_the_mlx_forms_on_any_thread_count(name, threads):
    """A second derivative, as MAML takes, through the backward kernel; 2048 rows so that several threads share
    them (a kernel splits rows at 65,536 elements a thread)."""
    ours, theirs, shapes, scale = PAIRS[name]
    theirs = DERIVATIVE_REFERENCES.get(name, theirs)
    shapes = [(32, 64, shapes[0][-1] * 2) if len(shape) == 3 else (shape[0] * 2,) for shape in shapes]
    inputs = [array(*shape, scale=scale) for shape in shapes]
    weights = array(*shapes[0])
    argnums = list(range(len(inputs)))

    def derivatives(fn):
        loss = lambda *a: (fn(*a) * weights).sum()
        curvature = lambda *a: sum(mx.square(g).sum() for g in mx.grad(loss, argnums)(*a))
        return mx.grad(loss, argnums)(*inputs), mx.grad(curvature, argnums)(*inputs)

    native.set_threads(threads)
    try:
        (first, second), (first_ref, second_ref) = derivatives(ours), derivatives(theirs)
        for got, want in zip(first + second, first_ref + second_ref):
            close(got, want, relative=2e-5)
    finally:
        native.set_threads(2)


@pytest.mark.parametrize("name", PAIRS)
def test_vmap_and_grad_in_either_order_equal_the_mlx_forms(name):
    """vmap(grad) and grad(vmap), mapping the rows over any axis (the last one too) with shared layer-norm
    weights, as a meta-batch of LoRA tasks does."""
    ours, theirs, shapes, scale = PAIRS[name]
    tasks = [array(4, *shapes[0], scale=scale)] + [array(*shape) for shape in shapes[1:]]
    in_axes = [0] + [None] * (len(shapes) - 1)
    for axis in (0, 2, 3):
        moved = [mx.moveaxis(tasks[0], 0, axis)] + tasks[1:]
        axes = [axis] + in_axes[1:]
        close(mx.vmap(ours, tuple(axes))(*moved), mx.vmap(theirs, tuple(axes))(*moved))
    weights = array(4, *shapes[0])
    loss = lambda fn: lambda x, *rest: (fn(x, *rest) * weights).sum()
    per_task = lambda fn: lambda x, w, *rest: (fn(x, *rest) * w).sum()
    for order in ("grad of vmap", "vmap of grad"):
        results = []
        for fn in (ours, theirs):
            if order == "grad of vmap":
                results.append(mx.grad(loss(mx.vmap(fn, tuple(in_axes))))(*tasks))
            else:
                mapped = mx.vmap(mx.grad(per_task(fn)), tuple([0, 0] + in_axes[1:]))
                results.append(mapped(tasks[0], weights, *tasks[1:]))
        close(*results, relative=2e-5)


def test_layer_norm_with_a_weight_a_task_under_vmap_and_its_gradients():
    """A meta-batch of full fine-tunings maps the scale and bias too: the kernels' vmap then runs per task."""
    x, scale, bias, weights = array(3, 7, 48), array(3, 48), array(3, 48), array(3, 7, 48)
    for fn in (native_layer_norm, mlx_layer_norm):
        close(mx.vmap(fn)(x, scale, bias), mx.vmap(mlx_layer_norm)(x, scale, bias))
    loss = lambda fn: lambda *a: (mx.vmap(fn)(*a) * weights).sum()
    ours, theirs = (mx.grad(loss(fn), [0, 1, 2])(x, scale, bias) for fn in (native_layer_norm, mlx_layer_norm))
    for got, want in zip(ours, theirs):
        close(got, want, relative=2e-5)
    per_task = lambda x, s, b, w: (native_layer_norm(x, s, b) * w).sum()
    per_task_ref = lambda x, s, b, w: (mlx_layer_norm(x, s, b) * w).sum()
    for got, want in zip(mx.vmap(mx.grad(per_task, [0, 1, 2]))(x, scale, bias, weights),
                         mx.vmap(mx.grad(per_task_ref, [0, 1, 2]))(x, scale, bias, weights)):
        close(got, want, relative=2e-5)


def test_compiled_and_eager_agree_and_masked_keys_stay_zero():
    scores = np.array(array(2, 3, 9, 11, scale=4.0))
    scores[..., -3:] -= 1e9  # padding, as hf_encoder masks it
    scores = mx.array(scores)
    out = mx.compile(native_ops.softmax)(scores)
    close(out, native_ops.softmax(scores), relative=0)
    # exactly 0: a subnormal number (e^-87 / sum) here made every product with these probabilities, forward and
    # backward, take the processor's slow path (on an Intel Xeon, the encoder's FOMAML step 237 s an iteration
    # against 7.9 to 9.1 s: docs/performance.md)
    gradient = mx.grad(lambda s: (native_ops.softmax(s) * s).sum())(scores)
    for values in (out, gradient):
        assert not np.any((np.array(values) != 0) & (np.abs(np.array(values)) < np.finfo(np.float32).tiny))
    assert np.array(out)[..., -3:].max() == 0
    x = array(5, 1536, scale=10.0)  # GELU's tails: exactly x above, 0 far below
    close(mx.compile(native_ops.gelu)(x), mlx_gelu(x))


def test_wrong_input_shapes_are_refused_by_name():
    with pytest.raises(ValueError, match="LayerNorm: input 1 has the wrong shape"):
        native.required().layer_norm(array(3, 8), array(7), array(8), EPS)


def test_kernels_choice_falls_back_or_fails_by_name(monkeypatch):
    chosen = native_ops.transformer_ops(native_ops.KernelKind.auto, mlx_softmax, mlx_gelu)
    assert chosen.kernels == "native" and chosen.softmax is native_ops.softmax
    kept = native_ops.transformer_ops(native_ops.KernelKind.native, lambda s: mx.softmax(s, axis=-1), mlx_gelu)
    assert kept.kernels == "native" and kept.softmax is not native_ops.softmax  # model.softmax=mlx is kept
    assert native_ops.transformer_ops(native_ops.KernelKind.mlx, mlx_softmax, mlx_gelu).kernels == "mlx"
    monkeypatch.setattr(native, "module", lambda: None)
    assert native_ops.transformer_ops(native_ops.KernelKind.auto, mlx_softmax, mlx_gelu).kernels == "mlx"
    with pytest.raises(ConfigError, match="model.kernels"):
        native_ops.transformer_ops(native_ops.KernelKind.native, mlx_softmax, mlx_gelu)


def test_the_encoder_gives_the_same_features_and_maml_gradients_with_either_kernels(tmp_path):
    """The tiny BERT of the reference tests, LoRA-free: features, a first-order gradient and MAML's second-order
    meta-gradient (one inner SGD step) with model.kernels=native and mlx."""
    from helpers import tiny_bert
    from metapeft.models.hf_encoder import HFEncoder, HFEncoderConfig

    bert_dir = tiny_bert(tmp_path / "bert")
    encoders = {kind: HFEncoder(HFEncoderConfig(path=str(bert_dir), kernels=kind), None, 3)
                for kind in ("native", "mlx")}
    assert encoders["native"].ops.kernels == "native" and encoders["mlx"].ops.kernels == "mlx"
    params = encoders["mlx"].pretrained(mx.random.key(0), 3)[0]
    ids = mx.array(encoders["mlx"].tokenize(["abc def", "ghij", "a b c d e f"]))
    targets = array(3, encoders["mlx"].width)

    def results(encoder):
        loss = lambda p: mx.square(encoder.features(p, ids) - targets).mean()
        adapted = lambda p: mlx.utils.tree_map(lambda w, g: w - 0.1 * g, p, mx.grad(loss)(p))
        return (encoder.features(params, ids), mlx.utils.tree_flatten(mx.grad(loss)(params)),
                mlx.utils.tree_flatten(mx.grad(lambda p: loss(adapted(p)))(params)))

    (features, first, second), (features_ref, first_ref, second_ref) = (results(encoders[k]) for k in encoders)
    close(features, features_ref, relative=1e-5)
    for ours, theirs in ((first, first_ref), (second, second_ref)):
        # relative to the largest gradient of all: some are rounding noise around 0 (a bias a layer norm removes)
        scale = max(float(mx.abs(g).max()) for _, g in theirs)
        for (name, got), (_, want) in zip(ours, theirs):
            np.testing.assert_allclose(np.array(got), np.array(want), atol=5e-5 * scale, rtol=0, err_msg=name)


@pytest.mark.parametrize("name", PAIRS)
def test_second_derivative_kernels_under_vmap_and_the_traced_third_derivative(name):
    """The backward passes' own backward passes (gelu_second, softmax_second, layer_norm_second) mapped over a
    meta-batch, as vmapped MAML takes them; a third derivative falls back to tracing the MLX form, and is right."""
    ours, theirs, shapes, scale = PAIRS[name]
    theirs = DERIVATIVE_REFERENCES.get(name, theirs)
    if name == "layer_norm":  # the scale and bias shared, as LoRA's frozen ones
        weights_and_bias = [array(*shape) for shape in shapes[1:]]
        ours, theirs = ((lambda f: lambda a: f(a, *weights_and_bias))(f) for f in (ours, theirs))
    x, weights = array(3, *shapes[0], scale=scale), array(3, *shapes[0])

    def curvature(fn):
        loss = lambda a, w: (fn(a) * w).sum()
        return lambda a, w: mx.square(mx.grad(loss)(a, w)).sum()

    close(mx.vmap(mx.grad(curvature(ours)))(x, weights), mx.vmap(mx.grad(curvature(theirs)))(x, weights),
          relative=2e-5)
    third = lambda fn: mx.grad(lambda a: mx.square(mx.grad(curvature(fn))(a, weights[0])).sum())(x[0])
    close(third(ours), third(theirs), relative=1e-4)



def test_on_the_gpu_auto_keeps_mlx_and_native_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(native_ops.mx, "default_device", lambda: mx.gpu)  # metapeft's stand-in for mlx.core
    assert native_ops.transformer_ops(native_ops.KernelKind.auto, mlx_softmax, mlx_gelu).kernels == "mlx"
    with pytest.raises(ConfigError, match="model.kernels.*CPU only"):
        native_ops.transformer_ops(native_ops.KernelKind.native, mlx_softmax, mlx_gelu)
