"""Milliseconds per meta-iteration of the project's compiled meta-step on fixed workloads.

    python runners/bench.py [--repeats 5] [--out outputs/benchmarks/bench.json]
    METAPEFT_BLAS=bundled python runners/bench.py        # the same with MLX's bundled reference BLAS

Workloads (issue 6): (a) sinusoid, MLP 1-40-40-1, meta-batch 25, K=10 support + 10 query, 1 inner SGD step
(lr 0.01), second-order MAML, Adam; (b) the same with 5 inner steps; (c) digits 5-way 5-shot, transformer + LoRA
rank 4, meta-batch 4, 5 inner steps, second-order MAML; (d) FOMAML and Reptile on (c). The step timed is the one
the runner uses (``metapeft.train.compiled_meta_step``), on pre-sampled batches, after warm-up; the figure is the
median over repeats. Peer implementations (JAX, PyTorch) are not part of this benchmark yet; it says so.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metapeft import blas, io  # noqa: E402  (before mlx)
import mlx.core as mx  # noqa: E402
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


def time_workload(overrides: list[str], repeats: int, seconds: float) -> dict:
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
    return {"ms_per_iteration": 1e3 * float(np.median(times)), "iterations_per_repeat": n, "repeats": repeats,
            "final_loss": loss.item()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=6.0, help="rough time budget per workload")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/bench.json"))
    args = parser.parse_args(argv)
    register_configs()
    peers = {name: "unavailable: no peer implementation in this benchmark yet"
             + ("" if importlib.util.find_spec(module) else f" (and {module} is not installed)")
             for name, module in (("jax", "jax"), ("pytorch", "torch"))}
    results = {name: time_workload(overrides, args.repeats, args.seconds) for name, overrides in WORKLOADS.items()}
    io.write_json(args.out, {"blas": blas.status(), "peers": peers, "workloads": results,
                             "overrides": WORKLOADS})
    print(f"BLAS: {blas.status()}")
    print(f"{'workload':28s} {'ms / meta-iteration':>20s}")
    for name, result in results.items():
        print(f"{name:28s} {result['ms_per_iteration']:20.3f}")
    for name, state in peers.items():
        print(f"peer {name}: {state}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
