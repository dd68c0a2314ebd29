"""Milliseconds per meta-iteration of the project's compiled meta-step on fixed workloads.

    python runners/bench.py [--repeats 5] [--out outputs/benchmarks/bench.json]
    METAPEFT_BLAS=bundled python runners/bench.py        # the same with MLX's bundled reference BLAS
    python runners/bench.py --memory 1000,10000          # memory after 1k and 10k iterations of each workload
    python runners/bench.py --runs                       # where whole quick runs spend their time
    python runners/bench.py --encoder-ops                # the encoder's largest operations, MLX vs PyTorch
    python runners/bench.py --per-call 1,2,4,8,16        # (a) with k meta-iterations per compiled call
    python runners/bench.py --evaluation                 # each part of a quick digits + LoRA run's evaluation
    python runners/bench.py --start-up                   # seconds to the first meta-iteration vs imports alone
    python runners/bench.py --encoder                    # MAML task by task, FOMAML, Reptile + LoRA, hf_encoder

Workloads: (a) sinusoid, MLP 1-40-40-1, meta-batch 25, K=10 support + 10 query, 1 inner SGD step
(lr 0.01), second-order MAML, Adam; (b) the same with 5 inner steps; (c) digits 5-way 5-shot, transformer + LoRA
rank 4, meta-batch 4, 5 inner steps, second-order MAML; (d) FOMAML and Reptile on (c). The step timed is the one
the runner uses (``metapeft.train.compiled_meta_step``), on pre-sampled batches, after warm-up; the figure is the
median over repeats. Peers (``runners/bench_peers.py``; ``pip install -e .[bench]``): JAX ``jit`` + ``vmap`` and
PyTorch ``torch.func`` for every workload, started from the same parameters and batches, each one's meta-loss
checked against ours before timing; a missing peer is reported, and the project is measured regardless.
Whole runs (``--runs``, ``--start-up``, ``--evaluation``) are in ``runners/bench_runs.py``, the encoder's benchmarks
in ``runners/bench_encoder.py``; this file times the workloads and is the command line for all of them.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from metapeft import affinity, blas, io
from metapeft.backend import mx, utils
from metapeft.tasks.base import Episodes
from metapeft.train import MetaTraining, TrainLog, compiled_meta_step, meta_train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the runners package, when run as a script
from runners import bench_encoder as encoder  # noqa: E402
from runners import bench_runs as runs  # noqa: E402
from runners.bench_peers import PEERS, time_steps  # noqa: E402  (JAX and PyTorch load only when used)
from runners.bench_setup import peer_spec, setup  # noqa: E402

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=6.0, help="rough time budget per workload")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/bench.json"))
    parser.add_argument("--memory", type=str, default=None, metavar="N1,N2",
                        help="instead of timing: memory after N1 and N2 iterations of each workload, e.g. 1000,10000")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), metavar="NAMES",
                        help=f"which of {list(WORKLOADS)} to time or (--memory) to run")
    parser.add_argument("--runs", action="store_true", help="instead of timing steps: phases of whole quick runs")
    parser.add_argument("--encoder-ops", action="store_true",
                        help="instead: the encoder's largest operations in MLX and PyTorch, each in its own process")
    parser.add_argument("--encoder-ops-one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--start-up-parts", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--encoder-one", nargs=2, metavar=("VARIANT", "IMPLEMENTATION"), help=argparse.SUPPRESS)
    parser.add_argument("--per-call", default=None, metavar="K1,K2,...",
                        help="instead: workload (a) with K meta-iterations per compiled call, e.g. 1,2,4,8,16")
    parser.add_argument("--evaluation", nargs="*", default=None, metavar="OVERRIDE",
                        help="instead: seconds of each part of a quick evaluation (default task=digits peft=lora)")
    parser.add_argument("--start-up", action="store_true",
                        help="instead: seconds to the first meta-iteration against `import mlx.core, hydra`")
    parser.add_argument("--encoder", nargs="?", const=encoder.ENCODER_DEFAULT, default=None, metavar="VARIANTS",
                        help=f"instead: these of {list(encoder.ENCODER_VARIANTS)} (default "
                        f"{encoder.ENCODER_DEFAULT}) + LoRA on model=hf_encoder")
    args = parser.parse_args(argv)
    for option, names, valid in (("--workloads", args.workloads, WORKLOADS),
                                 ("--encoder", args.encoder, encoder.ENCODER_VARIANTS)):
        if unknown := sorted(set((names or "").split(",")) - set(valid) - {""}):
            parser.error(f"{option}: unknown {unknown}; valid: {','.join(valid)}")
    if args.runs:
        results = runs.run_breakdown(args.out.parent / "runs")
        io.write_json(args.out.with_name("bench_runs.json"), {"blas": blas.status(), "runs": results,
                                                              "overrides": runs.RUNS})
        runs.print_breakdown(results)
        print(f"written to {args.out.with_name('bench_runs.json')}")
        return 0
    if args.per_call:
        per_call = iterations_per_call([int(k) for k in args.per_call.split(",")], args.repeats, args.seconds)
        io.write_json(args.out.with_name("bench_per_call.json"), {"blas": blas.status(), "ms_per_iteration": per_call})
        sampling = per_call.pop("numpy_sampling_ms")
        for k, ms in per_call.items():
            print(f"(a) {k:>3s} meta-iterations per compiled call: {ms:.3f} ms per meta-iteration "
                  f"({ms / per_call[next(iter(per_call))]:.2f}x the first)")
        print(f"(a) sampling a batch in NumPy, as the runner's loop does: {sampling:.3f} ms")
        return 0
    if args.evaluation is not None:
        overrides = args.evaluation or ["task=digits", "peft=lora"]
        parts = runs.evaluation_parts(overrides)
        io.write_json(args.out.with_name("bench_evaluation.json"), {"overrides": overrides, "seconds": parts})
        runs.print_evaluation(parts)
        return 0
    if args.start_up:
        result = runs.start_up(args.repeats, args.out.parent / "runs")
        io.write_json(args.out.with_name("bench_start_up.json"), result)
        runs.print_start_up(result, args.repeats)
        return 0
    if args.start_up_parts:
        runs.start_up_parts(args.start_up_parts)  # prints its parts and ends the process where the run would begin
        return 1  # reached only if the runner stopped before its run
    if args.encoder_ops_one:
        print(json.dumps(encoder.encoder_ops(args.encoder_ops_one)))
        return 0
    if args.encoder_ops:
        both = encoder.encoder_ops_both()
        io.write_json(args.out.with_name("bench_encoder_ops.json"), both)
        encoder.print_encoder_ops(both)
        return 0
    if args.encoder_one:
        print(json.dumps(encoder.encoder_one(*args.encoder_one, args.repeats)))
        return 0
    if args.encoder:
        results = encoder.encoder_workloads(args.repeats, args.encoder.split(","))
        io.write_json(args.out.with_name("bench_encoder.json"), {"blas": blas.status(), "workloads": results,
                                                                 "overrides": encoder.ENCODER})
        encoder.print_encoder(results)
        print(f"written to {args.out.with_name('bench_encoder.json')}")
        return 0
    if args.memory:
        checkpoints = sorted(int(n) for n in args.memory.split(","))
        memory = {name: memory_workload(WORKLOADS[name], checkpoints)
                  for name in args.workloads.split(",")}
        io.write_json(args.out.with_name("bench_memory.json"), {"blas": blas.status(), "memory": memory})
        for name, readings in memory.items():
            for n, r in readings.items():
                print(f"{name:24s} after {n:>6s} iterations: MLX peak {r['mlx_peak_mb']:8.2f} MB, MLX active "
                      f"{r['mlx_active_mb']:8.2f} MB, RSS {r['rss_mb']:8.1f} MB ({r['seconds']:.0f} s)")
        print(f"written to {args.out.with_name('bench_memory.json')}")
        return 0
    results = {name: time_workload(name, overrides, args.repeats, args.seconds)
               for name in args.workloads.split(",") for overrides in [WORKLOADS[name]]}
    io.write_json(args.out, {"blas": blas.status(), "device": str(mx.default_device()), "workloads": results,
                             "overrides": WORKLOADS})
    print(f"MLX device: {mx.default_device()}; BLAS: {blas.status()}; MLX thread placement while timing ours: "
          f"{next(iter(results.values()))['cpu_affinity']}")
    print(f"{'workload':24s} {'ours ms':>9s} {'JAX ms':>9s} {'ours/JAX':>9s} {'torch ms':>9s} {'ours/torch':>10s}")
    for name, result in results.items():
        cells, notes = [], []
        for peer_name in ("jax", "pytorch"):
            peer = result["peers"][peer_name]
            if isinstance(peer, dict):
                cells.append(f"{peer['ms_per_iteration']:9.3f} {peer['ours_over_peer']:9.2f}")
            else:
                cells.append(f"{'-':>9s} {'-':>9s}")
                notes.append(f"{peer_name} {peer}")
        print(f"{name:24s} {result['ms_per_iteration']:9.3f} {cells[0]} {cells[1]} {'; '.join(notes)}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
