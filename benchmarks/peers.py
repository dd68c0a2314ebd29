"""Peer implementations of the benchmark's meta-steps, for ``python -m benchmarks`` (optional:
``pip install -e .[bench]``).

The same meta-step as the project's, written once more in JAX (``jit`` + ``vmap``, optax) and in PyTorch
(``torch.func.grad`` + ``vmap``, eager): the sinusoid MLP of workloads (a) and (b), the digits transformer with LoRA
of (c) and (d), under second-order MAML, FOMAML or Reptile. Each peer starts from the project's own initial adapted
and frozen trees and its batches; the benchmark checks that its meta-loss on the first batch equals the
project's before timing it. The models are written once, over a small table of array operations (``Ops``), so both
peers compute exactly the same function.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from metapeft.trees import merge  # pure Python over dicts and lists: serves any array type


@dataclass
class Spec:
    """What a workload computes, read from the project's config by the benchmark."""

    model: str  # "mlp", "transformer" or "hf_encoder"
    loss: str  # "mse" or "cross_entropy"
    algorithm: str  # "maml", "fomaml" or "reptile"
    inner_lr: float
    inner_steps: int
    outer_lr: float
    outer_lr_final: float = 0.0  # Reptile: epsilon annealed linearly to this over num_iterations
    num_iterations: int = 10**6
    num_heads: int = 4
    num_tokens: int = 1
    token_dim: int = 1
    lora_scale: float = 0.0
    pad_id: int = 0  # hf_encoder: the token id of padding (masked out of attention and pooling)
    position_offset: int = 0  # hf_encoder: RoBERTa's positions start after the pad id
    layer_norm_eps: float = 1e-5
    tasks_per_pass: int | None = None  # 1: the meta-gradient task by task, accumulated (PyTorch peer)


@dataclass
class Ops:
    relu: Callable
    softmax: Callable  # over the last axis
    layer_norm: Callable  # (x, scale, bias, eps) over the last axis
    logsumexp: Callable  # over the last axis, keeping it
    take_labels: Callable  # (log_probs, labels) -> log_probs at the labels
    gelu: Callable  # exact (erf) GELU, as BERT's hidden_act "gelu"
    embed: Callable  # (table, ids) -> the table's rows at the ids


def model_and_loss(spec: Spec, ops: Ops) -> Callable:
    """loss(adapted, frozen, x, y) of the workload's model, as the project defines it."""

    def linear(p, x):
        out = x @ p["weight"] + p["bias"]
        if "lora_a" in p:
            out = out + spec.lora_scale * ((x @ p["lora_a"]) @ p["lora_b"])
        return out

    def mlp(p, x):
        for layer in p["hidden"]:
            x = ops.relu(linear(layer, x))
        return linear(p["head"], x)

    def attention(projections, out, h, bias=0.0):
        """Multi-head self-attention: query, key and value from ``projections``, then ``out``; ``bias`` masks keys."""
        *batch, length, width = h.shape
        heads = spec.num_heads

        def split_heads(t):
            return t.reshape(*batch, length, heads, width // heads).swapaxes(-2, -3)

        q, k, v = (split_heads(linear(projections[n], h)) for n in ("query", "key", "value"))
        scores = (q @ k.swapaxes(-1, -2)) / math.sqrt(width // heads) + bias
        mixed = (ops.softmax(scores) @ v).swapaxes(-2, -3).reshape(*batch, length, width)
        return linear(out, mixed)

    def transformer(p, x):
        tokens = x.reshape(*x.shape[: x.ndim - (1 if spec.num_tokens == 1 else 2)], spec.num_tokens, spec.token_dim)
        h = linear(p["embed"], tokens) + p["position"]
        for layer in p["layers"]:
            norm = layer["attention_norm"]
            h = h + attention(layer["attention"], layer["attention"]["out"], norm_(norm, h))
            norm, fc = layer["mlp_norm"], layer["mlp"]
            h = h + linear(fc["fc2"], ops.relu(linear(fc["fc1"], norm_(norm, h))))
        pooled = norm_(p["final_norm"], h)[..., -spec.num_tokens:, :].mean(-2)
        return linear(p["head"], pooled)

    def norm_(p, x):
        return ops.layer_norm(x, p["scale"], p["bias"], spec.layer_norm_eps)

    def hf_encoder(p, ids):
        """BERT's post-norm encoder (Hugging Face's names), mean-pooled over real tokens: models/hf_encoder.py."""
        mask = (ids != spec.pad_id) * 1.0
        e, length = p["embeddings"], ids.shape[-1]
        h = (ops.embed(e["word_embeddings"], ids) + e["position_embeddings"][spec.position_offset:
             spec.position_offset + length] + e["token_type_embeddings"][0])
        h = norm_(e["LayerNorm"], h)
        bias = ((1.0 - mask) * -1e9)[..., None, None, :]  # (..., heads, queries, keys): no attention to padding
        for layer in p["encoder"]["layer"]:
            a = layer["attention"]
            h = norm_(a["output"]["LayerNorm"], h + attention(a["self"], a["output"]["dense"], h, bias))
            hidden = ops.gelu(linear(layer["intermediate"]["dense"], h))
            h = norm_(layer["output"]["LayerNorm"], h + linear(layer["output"]["dense"], hidden))
        pooled = (h * mask[..., None]).sum(-2) / mask.sum(-1)[..., None]
        return linear(p["head"], pooled)

    forward = {"mlp": mlp, "transformer": transformer, "hf_encoder": hf_encoder}[spec.model]

    def loss(adapted, frozen, x, y):
        prediction = forward(merge(frozen, adapted), x)
        if spec.loss == "mse":
            return ((prediction - y) ** 2).mean()
        log_probs = prediction - ops.logsumexp(prediction)
        return -ops.take_labels(log_probs, y).mean()

    return loss


def jax_peer(spec: Spec, adapted: dict, frozen: dict, batches: list):
    """A jitted meta-step; returns (meta-loss on batches[0], step(i) -> loss, sync)."""
    import jax
    import jax.numpy as jnp
    import optax

    def layer_norm(x, scale, bias, eps):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + eps) * scale + bias

    ops = Ops(jax.nn.relu, lambda s: jax.nn.softmax(s, axis=-1), layer_norm,
              lambda z: jax.scipy.special.logsumexp(z, axis=-1, keepdims=True),
              lambda lp, y: jnp.take_along_axis(lp, y[..., None], axis=-1),
              lambda x: jax.nn.gelu(x, approximate=False), lambda table, ids: table[ids])
    loss = model_and_loss(spec, ops)
    first_order = spec.algorithm in ("fomaml", "reptile")

    def adapt(w, frozen, xs, ys):
        for _ in range(spec.inner_steps):
            grads = jax.grad(loss)(w, frozen, xs, ys)
            if first_order:
                grads = jax.lax.stop_gradient(grads)
            w = jax.tree_util.tree_map(lambda p, g: p - spec.inner_lr * g, w, grads)
        return w

    def meta_loss(w, frozen, xs, ys, xq, yq):
        per_task = jax.vmap(lambda *t: loss(adapt(w, frozen, t[0], t[1]), frozen, t[2], t[3]))
        return per_task(xs, ys, xq, yq).mean()

    if spec.algorithm == "reptile":
        def value_and_grad(w, frozen, xs, ys, xq, yq):
            def one_task(xs, ys, xq, yq):
                phi = adapt(w, frozen, xs, ys)
                return phi, loss(phi, frozen, xq, yq)

            phis, losses = jax.vmap(one_task)(xs, ys, xq, yq)
            return losses.mean(), jax.tree_util.tree_map(lambda t, p: t - p.mean(0), w, phis)

        optimizer = optax.sgd(optax.linear_schedule(spec.outer_lr, spec.outer_lr_final, spec.num_iterations))
    else:
        value_and_grad = jax.value_and_grad(meta_loss)
        optimizer = optax.adam(spec.outer_lr)

    @jax.jit
    def step(w, opt_state, frozen, xs, ys, xq, yq):
        value, grads = value_and_grad(w, frozen, xs, ys, xq, yq)
        updates, opt_state = optimizer.update(grads, opt_state, w)
        return value, optax.apply_updates(w, updates), opt_state

    as_jax = lambda tree: jax.tree_util.tree_map(jnp.asarray, tree)
    frozen_j, jax_batches = as_jax(frozen), [tuple(jnp.asarray(a) for a in b) for b in batches]
    state = {"w": as_jax(adapted)}
    state["opt"] = optimizer.init(state["w"])
    first = float(meta_loss(state["w"], frozen_j, *jax_batches[0]))

    def run_step(i: int):
        value, state["w"], state["opt"] = step(state["w"], state["opt"], frozen_j, *jax_batches[i % len(jax_batches)])
        return value

    return first, run_step, lambda v: v.block_until_ready()


def torch_peer(spec: Spec, adapted: dict, frozen: dict, batches: list):
    """An eager torch.func meta-step with torch.optim; returns (meta-loss on batches[0], step(i) -> loss, sync)."""
    import torch
    from torch.func import grad, grad_and_value, vmap
    from torch.utils._pytree import tree_flatten, tree_map

    ops = Ops(torch.relu, lambda s: torch.softmax(s, dim=-1),
              lambda x, scale, bias, eps: torch.nn.functional.layer_norm(x, x.shape[-1:], scale, bias, eps),
              lambda z: torch.logsumexp(z, dim=-1, keepdim=True),
              lambda lp, y: torch.take_along_dim(lp, y[..., None].long(), dim=-1),
              torch.nn.functional.gelu, lambda table, ids: table[ids.long()])
    loss = model_and_loss(spec, ops)
    first_order = spec.algorithm in ("fomaml", "reptile")

    def adapt(w, frozen, xs, ys):
        for _ in range(spec.inner_steps):
            grads = grad(loss)(w, frozen, xs, ys)
            if first_order:
                grads = tree_map(torch.Tensor.detach, grads)
            w = tree_map(lambda p, g: p - spec.inner_lr * g, w, grads)
        return w

    def meta_loss(w, frozen, xs, ys, xq, yq):
        per_task = vmap(lambda *t: loss(adapt(w, frozen, t[0], t[1]), frozen, t[2], t[3]))
        return per_task(xs, ys, xq, yq).mean()

    as_torch = lambda tree: tree_map(lambda a: torch.from_numpy(np.ascontiguousarray(a)), tree)
    frozen_t, torch_batches = as_torch(frozen), [tuple(torch.from_numpy(np.asarray(a)) for a in b) for b in batches]
    w = as_torch(adapted)
    leaves = tree_flatten(w)[0]
    if spec.algorithm == "reptile":
        optimizer = torch.optim.SGD(leaves, lr=spec.outer_lr)
        schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, spec.outer_lr_final / spec.outer_lr or 1e-12,
                                                     spec.num_iterations)

        def value_and_grad(xs, ys, xq, yq):
            with torch.no_grad():
                def one_task(xs, ys, xq, yq):
                    phi = adapt(w, frozen_t, xs, ys)
                    return phi, loss(phi, frozen_t, xq, yq)

                phis, losses = vmap(one_task)(xs, ys, xq, yq)
                return losses.mean(), tree_map(lambda t, p: t - p.mean(0), w, phis)
    elif spec.tasks_per_pass == 1:  # task by task, as a PyTorch user fits second-order MAML in memory
        def value_and_grad(xs, ys, xq, yq):
            value, grads = 0.0, None
            for task in range(len(xs)):
                task_loss = lambda w: loss(adapt(w, frozen_t, xs[task], ys[task]), frozen_t, xq[task], yq[task])
                g, v = grad_and_value(task_loss)(w)
                value = value + v.detach() / len(xs)
                g = tree_map(lambda t: t.detach() / len(xs), g)
                grads = g if grads is None else tree_map(torch.add, grads, g)
            return value, grads
    else:
        def value_and_grad(xs, ys, xq, yq):
            grads, value = grad_and_value(meta_loss)(w, frozen_t, xs, ys, xq, yq)
            return value, grads
    if spec.algorithm != "reptile":
        optimizer, schedule = torch.optim.Adam(leaves, lr=spec.outer_lr), None

    with torch.no_grad():
        first = float(meta_loss(w, frozen_t, *torch_batches[0]))

    def run_step(i: int):
        value, grads = value_and_grad(*torch_batches[i % len(torch_batches)])
        for leaf, g in zip(leaves, tree_flatten(grads)[0]):
            leaf.grad = g
        optimizer.step()  # in place: ``w`` holds the same tensors
        if schedule is not None:
            schedule.step()
        return value

    return first, run_step, lambda v: float(v)


PEERS = {"jax": (("jax", "optax"), jax_peer), "pytorch": (("torch",), torch_peer)}


def time_steps(run_step: Callable[[int], object], sync: Callable, repeats: int, iterations: int) -> float:
    for i in range(10):
        sync(run_step(i))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(iterations):
            value = run_step(i)
        sync(value)
        times.append((time.perf_counter() - start) / iterations)
    return 1e3 * float(np.median(times))
