"""Peer implementations of the benchmark's meta-steps, for ``runners/bench.py`` (optional: ``pip install -e .[bench]``).

JAX (``jit`` + ``vmap``, optax Adam) for workloads (a) and (b): second-order MAML on the sinusoid MLP. Each peer
starts from the project's own initial parameters and batches, and its meta-loss is checked against the project's
before it is timed.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def jax_sinusoid_maml(params: dict, batches: list, inner_lr: float, inner_steps: int, outer_lr: float):
    """A jitted MAML meta-step; returns (first meta-loss on batches[0], step function, state)."""
    import jax
    import jax.numpy as jnp
    import optax

    def mlp(p, x):
        for layer in p["hidden"]:
            x = jax.nn.relu(x @ layer["weight"] + layer["bias"])
        return x @ p["head"]["weight"] + p["head"]["bias"]

    def loss(p, x, y):
        return jnp.mean((mlp(p, x) - y) ** 2)

    def task_loss(p, xs, ys, xq, yq):
        for _ in range(inner_steps):
            grads = jax.grad(loss)(p, xs, ys)
            p = jax.tree_util.tree_map(lambda w, g: w - inner_lr * g, p, grads)
        return loss(p, xq, yq)

    def meta_loss(p, xs, ys, xq, yq):
        return jnp.mean(jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(p, xs, ys, xq, yq))

    optimizer = optax.adam(outer_lr)

    @jax.jit
    def step(p, opt_state, xs, ys, xq, yq):
        value, grads = jax.value_and_grad(meta_loss)(p, xs, ys, xq, yq)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return value, optax.apply_updates(p, updates), opt_state

    p = jax.tree_util.tree_map(jnp.asarray, params)
    jax_batches = [tuple(jnp.asarray(a) for a in b) for b in batches]
    first = float(meta_loss(p, *jax_batches[0]))
    state = {"p": p, "opt": optimizer.init(p)}

    def run_step(i: int):
        value, state["p"], state["opt"] = step(state["p"], state["opt"], *jax_batches[i % len(jax_batches)])
        return value

    return first, run_step, lambda v: v.block_until_ready()


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
