"""The attention softmax built from fused products (metapeft/models/softmax.py): its error bound, its first and
second derivatives against mx.softmax's, and the encoder with either softmax."""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from metapeft.models.softmax import exp_nonpositive, softmax


def test_exp_is_within_3e_7_relative_over_the_float32_range_softmax_uses():
    x = np.linspace(-87.0, 0.0, 2_000_001, dtype=np.float32)
    exact = np.exp(x.astype(np.float64))
    relative = np.abs(np.array(exp_nonpositive(mx.array(x)), np.float64) - exact) / exact
    assert relative.max() < 3e-7
    # below -87 exactly 0, as e^x rounds in float32 below -103.9: no subnormal number (masked keys) reaches a product
    assert np.array(exp_nonpositive(mx.array([-87.01, -100.0, -1e9, -np.inf]))).tolist() == [0.0] * 4


def test_softmax_equals_mx_softmax_with_masked_keys():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 4, 9, 11)).astype(np.float32) * 4
    scores[..., -3:] -= 1e9  # padding, as hf_encoder masks it
    ours, theirs = softmax(mx.array(scores)), mx.softmax(mx.array(scores), axis=-1)
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=1e-6, atol=1e-7)
    assert np.array(ours)[..., -3:].max() == 0  # not e^-87 / sum, a subnormal number (see test_native.py)


def test_first_and_second_derivatives_match_mx_softmax():
    rng = np.random.default_rng(1)
    scores, weights = (mx.array(rng.normal(size=(5, 8)).astype(np.float32) * 3) for _ in range(2))

    def derivatives(fn):
        loss = lambda s: (fn(s) * weights).sum()
        curvature = lambda s: mx.square(mx.grad(loss)(s)).sum()  # a second derivative, as MAML takes
        return np.array(mx.grad(loss)(scores)), np.array(mx.grad(curvature)(scores))

    (first, second), (first_ref, second_ref) = derivatives(softmax), derivatives(lambda s: mx.softmax(s, axis=-1))
    # the polynomial's derivative is e^r's Taylor polynomial of degree 5: relative error <= (ln 2 / 2)^6 / 6! = 2.4e-6
    np.testing.assert_allclose(first, first_ref, atol=1e-5 * np.abs(first_ref).max())
    np.testing.assert_allclose(second, second_ref, atol=1e-5 * np.abs(second_ref).max())
    assert mx.vmap(softmax)(scores[None]).shape == (1, 5, 8)


def test_the_encoder_gives_the_same_embeddings_with_either_softmax(tmp_path):
    from helpers import tiny_bert
    from metapeft.models.hf_encoder import HFEncoder, HFEncoderConfig

    bert_dir = tiny_bert(tmp_path / "bert")
    encoders = {kind: HFEncoder(HFEncoderConfig(path=str(bert_dir), softmax=kind), None, 3)
                for kind in ("polynomial", "mlx")}
    params = encoders["mlx"].pretrained(mx.random.key(0), 3)[0]
    ids = mx.array(encoders["mlx"].tokenize(["abc def", "ghij", "a b c d e f"]))
    polynomial, reference = (np.array(encoders[k].features(params, ids)) for k in ("polynomial", "mlx"))
    np.testing.assert_allclose(polynomial, reference, atol=1e-5)


def test_given_derivative_of_exp_is_the_traced_one_first_and_second_order():
    """``exp_nonpositive``'s derivative is written out (``exp_slope``); it must be the derivative autodiff
    traces through the same polynomial, to float64 rounding, at first and second order, under vmap, and where x is
    clamped at -87 (derivative 0)."""
    traced = exp_nonpositive.forward  # the same polynomial, differentiated by MLX
    with mx.stream(mx.cpu):
        x = mx.array(np.concatenate([np.linspace(-100.0, 0.0, 4001), [-87.0, -87.5]])).astype(mx.float64)
        np.testing.assert_array_equal(np.array(exp_nonpositive(x)), np.array(traced(x)))
        for f in (lambda v: v.sum(), lambda v: (v ** 2).sum()):
            first = [np.array(mx.grad(lambda u: f(e(u)))(x)) for e in (exp_nonpositive, traced)]
            np.testing.assert_allclose(*first, rtol=1e-12, atol=1e-300)
            second = [np.array(mx.grad(lambda w: mx.grad(lambda u: f(e(u)))(w).sum())(x)) for e in (exp_nonpositive,
                                                                                                  traced)]
            np.testing.assert_allclose(*second, rtol=1e-12, atol=1e-300)
        assert np.array(mx.grad(lambda u: exp_nonpositive(u).sum())(mx.array([-90.0, -1e9])) == 0).all()
        tasks = x[:4000].reshape(4, 1000)
        vmapped = [np.array(mx.vmap(mx.grad(lambda u: (e(u) ** 2).sum()))(tasks)) for e in (exp_nonpositive, traced)]
        np.testing.assert_allclose(*vmapped, rtol=1e-12, atol=1e-300)
