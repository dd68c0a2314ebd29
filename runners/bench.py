"""Milliseconds per meta-iteration of the project's compiled meta-step on fixed workloads.

    python runners/bench.py [--repeats 5] [--out outputs/benchmarks/bench.json]
    METAPEFT_BLAS=bundled python runners/bench.py        # the same with MLX's bundled reference BLAS

Workloads (issue 6): (a) sinusoid, MLP 1-40-40-1, meta-batch 25, K=10 support + 10 query, 1 inner SGD step
(lr 0.01), second-order MAML, Adam; (b) the same with 5 inner steps; (c) digits 5-way 5-shot, transformer + LoRA
rank 4, meta-batch 4, 5 inner steps, second-order MAML; (d) FOMAML and Reptile on (c). The step timed is the one
the runner uses (``metapeft.train.compiled_meta_step``), on pre-sampled batches, after warm-up; the figure is the
median over repeats. Peers (``runners/bench_peers.py``; ``pip install -e .[bench]``): JAX ``jit`` + ``vmap`` for
(a) and (b), started from the same parameters and batches, its meta-loss checked against ours before timing. No
peer exists yet for (c) and (d), nor a PyTorch one; the output says so.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, and runners.bench_peers

from metapeft import blas, io  # noqa: E402  (before mlx)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_map  # noqa: E402
import numpy as np  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from metapeft.config import register_configs  # noqa: E402
from metapeft.experiment import build  # noqa: E402
from metapeft.train import compiled_meta_step  # noqa: E402

CONF = str(Path(__file__).resolve().parents[1] / "conf")
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


def peer_timings(name: str, cfg, meta: dict, batches: list, our_first_loss: float, repeats: int, n: int) -> dict:
    if not name.startswith(("a_", "b_")):
        return {"jax": "no peer implementation for this workload yet"}
    if importlib.util.find_spec("jax") is None or importlib.util.find_spec("optax") is None:
        return {"jax": "unavailable: pip install -e '.[bench]'"}
    from runners.bench_peers import jax_sinusoid_maml, time_steps

    params = tree_map(lambda a: np.array(a), meta["weights"])
    numpy_batches = [tuple(np.array(a) for a in b) for b in batches]
    first, run_step, sync = jax_sinusoid_maml(params, numpy_batches, cfg.algorithm.inner_lr,
                                              cfg.algorithm.num_inner_steps, cfg.algorithm.outer_lr)
    if not np.isclose(first, our_first_loss, rtol=1e-4):
        return {"jax": f"refused: its meta-loss {first} differs from ours {our_first_loss}"}
    return {"jax": {"ms_per_iteration": time_steps(run_step, sync, repeats, n), "same_loss_checked": first}}


def time_workload(name: str, overrides: list[str], repeats: int, seconds: float) -> dict:
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose(config_name="config", overrides=overrides)
    exp = build(cfg)
    key = mx.random.key(0)
    backbone = exp.model.init(key)  # timing does not depend on pretrained values
    inputs, _ = exp.task.pretraining_batch(np.random.default_rng(0), 64)
    frozen, adapted = exp.peft.frozen(backbone), exp.peft.init_adapted(backbone, key, inputs)
    meta = exp.learner.meta_parameters(adapted)
    optimizer = exp.learner.make_optimizer(10**6)
    optimizer.init(meta)
    step = compiled_meta_step(exp.learner, optimizer)
    rng = np.random.default_rng(0)
    batches = [exp.task.sample("train", cfg.algorithm.meta_batch_size, cfg.shots.train, rng) for _ in range(8)]
    our_first_loss = exp.learner.meta_loss(meta, frozen, batches[0]).item()
    initial_meta = meta
    for i in range(10):  # warm-up, compilation included
        loss, meta, grads = step(meta, frozen, *batches[i % 8])
        mx.eval(loss, meta, grads)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds / (repeats + 1):  # pick an iteration count per repeat
        loss, meta, grads = step(meta, frozen, *batches[n % 8])
        mx.eval(loss, meta, grads)
        n += 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(n):
            loss, meta, grads = step(meta, frozen, *batches[i % 8])
            mx.eval(loss, meta, grads)
        times.append((time.perf_counter() - start) / n)
    ours = 1e3 * float(np.median(times))
    peers = peer_timings(name, cfg, initial_meta, batches, our_first_loss, repeats, n)
    for peer in peers.values():
        if isinstance(peer, dict):
            peer["ours_over_peer"] = ours / peer["ms_per_iteration"]
    return {"ms_per_iteration": ours, "iterations_per_repeat": n, "repeats": repeats, "peers": peers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=6.0, help="rough time budget per workload")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/bench.json"))
    args = parser.parse_args(argv)
    register_configs()
    results = {name: time_workload(name, overrides, args.repeats, args.seconds)
               for name, overrides in WORKLOADS.items()}
    io.write_json(args.out, {"blas": blas.status(), "workloads": results, "overrides": WORKLOADS,
                             "pytorch": "no peer implementation yet"})
    print(f"BLAS: {blas.status()}")
    print(f"{'workload':26s} {'ours ms/iter':>13s} {'JAX ms/iter':>12s} {'ours / JAX':>11s}")
    for name, result in results.items():
        jax = result["peers"]["jax"]
        peer = (f"{jax['ms_per_iteration']:12.3f} {jax['ours_over_peer']:11.2f}" if isinstance(jax, dict)
                else f"  {jax}")
        print(f"{name:26s} {result['ms_per_iteration']:13.3f} {peer}")
    print(f"PyTorch peer: no implementation yet\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
