"""Milliseconds per meta-iteration of the project's compiled meta-step on fixed workloads (``python -m benchmarks
steps``), its memory over long runs (``memory``) and with several meta-iterations per compiled call (``per-call``).

Workloads: (a) sinusoid, MLP 1-40-40-1, meta-batch 25, K=10 support + 10 query, 1 inner SGD step (lr 0.01),
second-order MAML, Adam; (b) the same with 5 inner steps; (c) digits 5-way 5-shot, transformer + LoRA rank 4,
meta-batch 4, 5 inner steps, second-order MAML; (d) FOMAML and Reptile on (c). The step timed is the one the runner
uses (``metapeft.train.compiled_meta_step``), on pre-sampled batches, after warm-up; the figure is the median over
repeats. Peers (``benchmarks/peers.py``; ``pip install -e .[bench]``): JAX ``jit`` + ``vmap`` and PyTorch
``torch.func`` for every workload, started from the same parameters and batches, each one's meta-loss checked against
ours before timing; a missing peer is reported, and the project is measured regardless.
"""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.common import peer_spec, setup
from benchmarks.peers import PEERS, time_steps  # JAX and PyTorch load only when used
from metapeft import affinity
from metapeft.backend import mx, utils
from metapeft.tasks.base import Episodes
from metapeft.train import MetaTraining, TrainLog, compiled_meta_step, meta_train

DIGITS_LORA = ["task=digits", "peft=lora", "peft.rank=4", "shots.train=5", "algorithm.meta_batch_size=4",
               "algorithm.num_inner_steps=5"]
WORKLOADS = {
    "a_sinusoid_maml_1step": ["task=sinusoid", "algorithm=maml", "shots.train=10", "task.num_query=10",
                              "algorithm.meta_batch_size=25", "algorithm.num_inner_steps=1", "algorithm.inner_lr=0.01"],
    "b_sinusoid_maml_5steps": ["task=sinusoid", "algorithm=maml", "shots.train=10", "task.num_query=10",
                               "algorithm.meta_batch_size=25", "algorithm.num_inner_steps=5",
                               "algorithm.inner_lr=0.01"],
    "c_digits_lora_maml": ["algorithm=maml", *DIGITS_LORA],
    "d_digits_lora_fomaml": ["algorithm=fomaml", *DIGITS_LORA],
    "d_digits_lora_reptile": ["algorithm=reptile", *DIGITS_LORA],
}


def peer_timings(exp, meta: dict, frozen: dict, batches: list, our_first_loss: float, repeats: int, n: int) -> dict:
    """Each peer's ms per iteration, timed only if its meta-loss on the first batch equals ours."""
    spec = peer_spec(exp)
    to_numpy = lambda tree: utils.tree_map(lambda a: np.array(a), tree)
    numpy_batches = [tuple(np.array(a) for a in b) for b in batches]
    results = {}
    for name, (modules, make_peer) in PEERS.items():
        if any(importlib.util.find_spec(m) is None for m in modules):
            results[name] = "unavailable: pip install -e '.[bench]'"
            continue
        first, run_step, sync = make_peer(spec, to_numpy(meta["weights"]), to_numpy(frozen), numpy_batches)
        if not np.isclose(first, our_first_loss, rtol=1e-4):
            results[name] = f"refused: its meta-loss {first} differs from ours {our_first_loss}"
            continue
        results[name] = {"ms_per_iteration": time_steps(run_step, sync, repeats, n), "same_loss_checked": first}
    return results


def memory_workload(overrides: list[str], checkpoints: list[int]) -> dict:
    """Peak and current memory after each checkpoint's number of iterations of the runner's own training loop
    (fresh batches every iteration, history kept, as in a run)."""
    exp, meta, frozen = setup(overrides)
    cfg, rng, readings = exp.cfg, np.random.default_rng(0), {}
    mx.reset_peak_memory()

    def record(weights, grads, frozen, state, iteration, num_iterations):
        if iteration + 1 in checkpoints:
            readings[str(iteration + 1)] = {"mlx_peak_mb": mx.get_peak_memory() / 2**20,
                                            "mlx_active_mb": mx.get_active_memory() / 2**20,
                                            "rss_mb": current_rss_mb(), "seconds": time.perf_counter() - start}
        return frozen, state

    start = time.perf_counter()
    meta_train(exp.learner, meta, frozen, MetaTraining(
        lambda: exp.task.sample("train", cfg.algorithm.meta_batch_size, cfg.shots.train, rng), max(checkpoints),
        validate=lambda meta, frozen: 0.0, val_interval=10**9, progress=False, after_step=record), TrainLog())
    return readings


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")  # not Linux


def time_workload(name: str, overrides: list[str], repeats: int, seconds: float) -> dict:
    exp, meta, frozen = setup(overrides)
    cfg = exp.cfg
    optimizer = exp.learner.make_optimizer(10**6)
    optimizer.init(meta)
    step = compiled_meta_step(exp.learner, optimizer)
    rng = np.random.default_rng(0)
    batches = [exp.task.sample("train", cfg.algorithm.meta_batch_size, cfg.shots.train, rng) for _ in range(8)]
    our_first_loss = exp.learner.meta_value_and_grad(meta, frozen, batches[0])[0].item()  # every algorithm has it
    initial_meta, state = meta, {"meta": meta}

    def run_step(i: int) -> mx.array:
        loss, state["meta"], grads = step(state["meta"], frozen, *batches[i % 8])
        mx.eval(loss, state["meta"], grads)  # MLX is lazy: every step is evaluated, as in the runner's loop
        return loss

    run_step(0)  # compilation
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds / (repeats + 1):  # pick an iteration count per repeat
        run_step(n)
        n += 1
    with affinity.colocated() as placement:  # as in the runner; released before the peers start their thread pools
        ours = time_steps(run_step, lambda loss: None, repeats, n)
    peers = peer_timings(exp, initial_meta, frozen, batches, our_first_loss, repeats, n)
    for peer in peers.values():
        if isinstance(peer, dict):
            peer["ours_over_peer"] = ours / peer["ms_per_iteration"]
    return {"ms_per_iteration": ours, "iterations_per_repeat": n, "repeats": repeats, "cpu_affinity": placement,
            "peers": peers}


def iterations_per_call(counts: list[int], repeats: int, seconds: float) -> dict:
    """Workload (a) with k meta-iterations (k batches stacked, a loop inside ``mx.compile``) per compiled call:
    ms per meta-iteration for each k on the same 64 pre-sampled batches, the k timed in turn, ``repeats`` rounds
    (medians), so that a change in the machine's load falls on all of them."""
    exp, meta, frozen = setup(WORKLOADS["a_sinusoid_maml_1step"])
    rng = np.random.default_rng(0)
    batches = [exp.task.sample("train", 25, 10, rng) for _ in range(64)]

    def make(k: int) -> Callable[[int], None]:
        optimizer = exp.learner.make_optimizer(10**6)
        optimizer.init(meta)

        def several(meta, frozen, xs, ys, xq, yq):
            losses = []
            for i in range(k):
                loss, grads = exp.learner.meta_value_and_grad(meta, frozen, Episodes(xs[i], ys[i], xq[i], yq[i]))
                meta = optimizer.apply_gradients(grads, meta)
                losses.append(loss)
            return mx.stack(losses), meta

        state = [optimizer.state, mx.random.state]
        step = mx.compile(several, inputs=state, outputs=state)
        stacked = [[mx.stack([batches[(j * k + i) % 64][a] for i in range(k)]) for a in range(4)]
                   for j in range(max(1, 64 // k))]
        current = {"meta": meta}

        def run_calls(calls: int) -> None:
            for j in range(calls):
                losses, current["meta"] = step(current["meta"], frozen, *stacked[j % len(stacked)])
                mx.eval(losses, current["meta"])

        run_calls(2)  # compilation
        return run_calls

    runners = {k: make(k) for k in counts}
    iterations = max(16, int(seconds / repeats / len(counts) / 1.5e-3))  # per k and round, at ~1.5 ms each
    times: dict[int, list[float]] = {k: [] for k in counts}
    with affinity.colocated():
        for _ in range(repeats):
            for k, run_calls in runners.items():
                start = time.perf_counter()
                run_calls(max(1, iterations // k))
                times[k].append(1e3 * (time.perf_counter() - start) / (max(1, iterations // k) * k))
    results = {str(k): float(np.median(t)) for k, t in times.items()}
    start = time.perf_counter()
    for _ in range(2000):  # what generating the batch inside the compiled step could save: NumPy's sampling
        exp.task.sample("train", 25, 10, rng)
    results["numpy_sampling_ms"] = 1e3 * (time.perf_counter() - start) / 2000
    return results
