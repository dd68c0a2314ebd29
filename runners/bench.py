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

Workloads (issue 6): (a) sinusoid, MLP 1-40-40-1, meta-batch 25, K=10 support + 10 query, 1 inner SGD step
(lr 0.01), second-order MAML, Adam; (b) the same with 5 inner steps; (c) digits 5-way 5-shot, transformer + LoRA
rank 4, meta-batch 4, 5 inner steps, second-order MAML; (d) FOMAML and Reptile on (c). The step timed is the one
the runner uses (``metapeft.train.compiled_meta_step``), on pre-sampled batches, after warm-up; the figure is the
median over repeats. Peers (``runners/bench_peers.py``; ``pip install -e .[bench]``): JAX ``jit`` + ``vmap`` and
PyTorch ``torch.func`` for every workload, started from the same parameters and batches, each one's meta-loss
checked against ours before timing; a missing peer is reported, and the project is measured regardless.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from hydra import compose, initialize_config_dir

from metapeft import affinity, blas, io
from metapeft.backend import mx, utils
from metapeft.build import build
from metapeft.config import register_configs
from metapeft.tasks.base import Episodes
from metapeft.train import TrainLog, compiled_meta_step, meta_train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runners.bench_peers, run as a script
from runners.bench_peers import PEERS, Spec, time_steps  # noqa: E402  (JAX and PyTorch load only when used)

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


def peer_spec(exp):
    cfg = exp.cfg
    spec = Spec(model=cfg.model.name, loss="mse" if cfg.task.name == "sinusoid" else "cross_entropy",
                algorithm=cfg.algorithm.name, inner_lr=cfg.algorithm.inner_lr,
                inner_steps=cfg.algorithm.num_inner_steps, outer_lr=cfg.algorithm.outer_lr,
                outer_lr_final=cfg.algorithm.get("outer_lr_final", 0.0), num_iterations=10**6)
    if cfg.model.name == "transformer":
        spec.num_heads, spec.num_tokens, spec.token_dim = cfg.model.num_heads, exp.model.num_tokens, exp.model.token_dim
    if cfg.model.name == "hf_encoder":
        model = exp.model
        spec.num_heads, spec.pad_id, spec.position_offset = model.num_heads, model.pad_id, model.position_offset
        spec.layer_norm_eps, spec.tasks_per_pass = model.eps, cfg.algorithm.tasks_per_pass
    if cfg.peft.name == "lora":
        spec.lora_scale = cfg.peft.alpha / cfg.peft.rank
    return spec


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


def setup(overrides: list[str]):
    """The workload's experiment, initial meta-parameters and frozen tree (timing does not depend on
    pretrained values, so the backbone is a fresh initialization)."""
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose(config_name="config", overrides=overrides)
    exp = build(cfg)
    key = mx.random.key(0)
    backbone = exp.model.init(key)
    inputs, _ = exp.task.pretraining_batch(np.random.default_rng(0), 64)
    frozen, adapted = exp.peft.frozen(backbone), exp.peft.init_adapted(backbone, key, inputs)
    return exp, exp.learner.meta_parameters(adapted), frozen


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
    meta_train(exp.learner, meta, frozen,
               lambda: exp.task.sample("train", cfg.algorithm.meta_batch_size, cfg.shots.train, rng),
               max(checkpoints), validate=lambda meta, frozen: 0.0, val_interval=10**9, log=TrainLog(),
               progress=False, after_step=record)
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
    (medians), so that a change in the machine's load falls on all of them (issue 18's first idea for (a))."""
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


def evaluation_parts(overrides: list[str], repeats: int = 2) -> dict:
    """Seconds of each part of a run's evaluation (``metapeft.evaluate.evaluate_shots``) at every K: the meta-learned
    model's adaptation curves, as the runner computes them (vmapped) and compiled (``mx.compile`` over the same
    vmapped function, the meta-parameters as inputs), and each baseline; the last of ``repeats`` timings each."""
    from metapeft.baselines import make_baselines
    from metapeft.build import initial_state, pretrained
    from metapeft.evaluate import curves_over_tasks, learner_curves

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose(config_name="config", overrides=overrides)
    exp = build(cfg)
    start = initial_state(exp)
    meta, frozen, learner, steps = exp.learner.meta_parameters(start.adapted), start.frozen, exp.learner, \
        cfg.evaluation.curve_steps

    def curves(meta, frozen, *episodes):  # the runner's curves, with the meta-parameters as the compiled inputs
        return curves_over_tasks(lambda x, y: learner.task_start(meta, frozen, x, y),
                                 lambda w, x, y: learner.inner_step(meta, w, frozen, x, y),
                                 lambda w, x, y: exp.metric(w, frozen, x, y), steps)(*episodes)

    compiled = mx.compile(curves, inputs=[mx.random.state], outputs=[mx.random.state])
    parts = {"curves (as the runner)": lambda e: learner_curves(exp, meta, frozen, e, steps),
             "curves compiled": lambda e: np.array(compiled(meta, frozen, *e)),
             **{f"baseline {name}": fn for name, fn in make_baselines(exp, start.plain, frozen,
                                                                      lambda: pretrained(exp)[0]).items()}}
    results = {}
    with affinity.colocated():
        for k in cfg.shots.eval:
            episodes = exp.task.sample("test", cfg.mode.num_eval_tasks, k, np.random.default_rng([cfg.seed, 2, k]))
            for name, part in parts.items():
                for _ in range(repeats):
                    began = time.perf_counter()
                    part(episodes)
                    results.setdefault(name, {})[str(k)] = time.perf_counter() - began
    return results


# Whole runs whose time --runs splits into phases (metrics.json "seconds"), quick mode.
RUNS = {
    "sinusoid_maml_mlp": [],
    "digits_maml_mlp": ["task=digits"],
    "digits_maml_lora": ["task=digits", "peft=lora"],
    "digits_maml_adalora": ["task=digits", "peft=adalora"],
    "digits_maml_prompt_tuning": ["task=digits", "peft=prompt_tuning"],
}
# (issue 18) second-order MAML + LoRA over the pretrained encoder: meta-batch 4, 5 inner steps, 5-way 5-shot,
# 64 tokens per text; FOMAML and Reptile beside it.
ENCODER = ["model=hf_encoder", "task=text", "peft=lora", "algorithm.meta_batch_size=4", "algorithm.num_inner_steps=5",
           "shots.train=5", "model.max_length=64"]
ENCODER_VARIANTS = {
    # all 4 tasks vmapped at once: killed by the out-of-memory killer at 24 GB; run only when named
    "maml": ["algorithm=maml"],
    "maml_task_by_task": ["algorithm=maml", "algorithm.tasks_per_pass=1"],
    "maml_task_by_task_checkpointed": ["algorithm=maml", "algorithm.tasks_per_pass=1",
                                       "algorithm.checkpoint_inner_steps=true"],
    "fomaml": ["algorithm=fomaml"],
    "reptile": ["algorithm=reptile"],
}
ENCODER_DEFAULT = "maml_task_by_task,maml_task_by_task_checkpointed,fomaml,reptile"


def run_breakdown(out_dir: Path) -> dict:
    """Each quick run of RUNS, started as a user starts it, and the seconds it spent per phase."""
    results = {}
    for name, overrides in RUNS.items():
        run_dir = out_dir / name
        started = time.perf_counter()
        subprocess.run([sys.executable, str(Path(__file__).with_name("run.py")), *overrides, "progress=false",
                        f"hydra.run.dir={run_dir}"], check=True, capture_output=True)
        seconds = io.read_json(run_dir / "metrics.json")["seconds"]
        seconds["wall_from_outside"] = time.perf_counter() - started
        results[name] = seconds
    return results


# The same clock for both sides: seconds from the process's start (/proc), read where each is done.
IMPORTS_ONLY = ("import os, mlx.core, hydra; "
                "ticks = int(open('/proc/self/stat').read().rsplit(')', 1)[1].split()[19]); "
                "print(float(open('/proc/uptime').read().split()[0]) - ticks / os.sysconf('SC_CLK_TCK'))")


def start_up_parts(run_dir: Path) -> None:
    """The runner, in this process, stopped where its run would begin: seconds since the process started, and the
    time inside Hydra's composition and in loading MLX and the BLAS on the way (``--start-up`` runs this alone)."""
    import runpy

    from hydra._internal.hydra import Hydra

    from metapeft import backend, experiment
    from metapeft.measure import seconds_since_process_start

    # Python's start and this script's imports (Hydra, NumPy, metapeft: what the runner imports too)
    parts = {"python_and_imports_s": seconds_since_process_start(), "compose_s": 0.0, "load_mlx_and_blas_s": 0.0,
             "compositions": 0}

    def timed(key: str, function: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                parts[key] += time.perf_counter() - start
                parts["compositions"] += key == "compose_s"

        return wrapper

    def stop_at_run(*args, **kwargs):
        parts["process_to_run_s"] = seconds_since_process_start()
        print(json.dumps(parts), flush=True)
        os._exit(0)  # here, not through Hydra's and the runner's error handling

    Hydra.compose_config = timed("compose_s", Hydra.compose_config)
    backend.load = timed("load_mlx_and_blas_s", backend.load)
    experiment.run = stop_at_run
    sys.argv = ["run.py", "mode=tiny", "progress=false", f"hydra.run.dir={run_dir}"]
    runpy.run_path(str(Path(__file__).with_name("run.py")), run_name="__main__")


def start_up(repeats: int, out_dir: Path) -> dict:
    """Seconds from process start to the first meta-iteration of the default job (mode=tiny), against the
    seconds to ``import mlx.core, hydra`` alone; medians of ``repeats`` alternating runs."""
    imports, runner = [], []
    for repeat in range(repeats):
        done = subprocess.run([sys.executable, "-c", IMPORTS_ONLY], check=True, capture_output=True, text=True)
        imports.append(float(done.stdout))
        run_dir = out_dir / f"start_up_{repeat}"
        subprocess.run([sys.executable, str(Path(__file__).with_name("run.py")), "mode=tiny", "progress=false",
                        f"hydra.run.dir={run_dir}"], check=True, capture_output=True)
        runner.append(io.read_json(run_dir / "metrics.json")["train"]["seconds_to_first_iteration"])
    result = {"import_mlx_hydra_seconds": float(np.median(imports)), "to_first_iteration_seconds":
              float(np.median(runner)), "all_imports": imports, "all_runner": runner}
    result["ratio"] = result["to_first_iteration_seconds"] / result["import_mlx_hydra_seconds"]
    parts = [json.loads(subprocess.run([sys.executable, __file__, "--start-up-parts", str(out_dir / "parts")],
                                       check=True, capture_output=True, text=True).stdout.splitlines()[-1])
             for _ in range(repeats)]
    result["parts"] = {key: float(np.median([p[key] for p in parts])) for key in parts[0]}
    return result


def print_breakdown(results: dict) -> None:
    phases = [p for p in next(iter(results.values())) if p not in ("total", "wall_from_outside")]
    print(f"{'run':28s} {'total s':>8s} {'meta-train':>10s} {'not meta-training':>18s}  largest other phases")
    for name, seconds in results.items():
        total = seconds["total"]
        others = sorted(((seconds[p], p) for p in phases if p != "meta_training"), reverse=True)[:3]
        print(f"{name:28s} {total:8.1f} {seconds['meta_training']:10.1f} {1 - seconds['meta_training'] / total:17.0%}"
              f"  " + ", ".join(f"{p} {v:.1f}" for v, p in others))


def encoder_one(variant: str, implementation: str, repeats: int) -> dict:
    """One of ENCODER_VARIANTS by ``mlx`` (the runner's own compiled step) or its ``pytorch`` peer (torch.func,
    eager; task by task where ours is), on the same batches from the same start: ms per iteration after one
    warm-up iteration, the loss of the first, and the process's peak resident memory (run alone in a process)."""
    import resource

    exp, meta, frozen = setup([*ENCODER, *ENCODER_VARIANTS[variant]])
    rng = np.random.default_rng(0)
    batches = [exp.task.sample("train", 4, 5, rng) for _ in range(repeats + 1)]
    result: dict = {"implementation": implementation, "sequence_length": int(batches[0].xs.shape[-1])}
    if implementation == "mlx":
        optimizer = exp.learner.make_optimizer(10**6)
        optimizer.init(meta)
        step, state = compiled_meta_step(exp.learner, optimizer), {"meta": meta}
        mx.eval(meta, frozen)

        def run_step(i: int) -> float:
            loss, state["meta"], grads = step(state["meta"], frozen, *batches[i])
            mx.eval(loss, state["meta"], grads)
            return loss.item()
    else:
        from runners.bench_peers import torch_peer

        to_numpy = lambda tree: utils.tree_map(lambda a: np.array(a), tree)
        _, peer_step, sync = torch_peer(peer_spec(exp), to_numpy(meta["weights"]), to_numpy(frozen),
                                            [tuple(np.array(a) for a in b) for b in batches])
        del meta, frozen  # the peer holds its own copies
        run_step = lambda i: sync(peer_step(i))  # the meta-loss before the update, as ours
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        loss = run_step(i)
        times.append(time.perf_counter() - start)
        result.setdefault("first_loss", loss)  # the meta-loss on the first batch, before any update
    result.update(ms_per_iteration=1e3 * float(np.median(times[1:])), first_ms=1e3 * times[0],
                  max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if implementation == "mlx":
        result["mlx_peak_mb"] = mx.get_peak_memory() / 2**20
    return result


# ENCODER_VARIANTS with a PyTorch peer: the same computation, task by task where ours is (checkpointed or not)
PEER_OF = {"maml_task_by_task": "maml_task_by_task", "maml_task_by_task_checkpointed": "maml_task_by_task",
           "fomaml": "fomaml", "reptile": "reptile"}


def encoder_ops(implementation: str, repeats: int = 20) -> dict:
    """Milliseconds per call of the encoder's largest operations at bench --encoder's shapes (25 texts of 39 tokens,
    MiniLM's widths), in MLX (compiled, as in the meta-step) or PyTorch (eager, its own threads)."""
    rng = np.random.default_rng(0)
    shapes = {"x": (975, 384), "w": (384, 1536), "h": (975, 1536), "scores": (25, 12, 39, 39)}
    data = {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}
    if implementation == "mlx":
        from metapeft.models.hf_encoder import gelu

        x, w, h, scores = (mx.array(data[n]) for n in ("x", "w", "h", "scores"))
        scale, bias = mx.ones((384,)), mx.zeros((384,))
        compiled_gelu, softmax = mx.compile(gelu), mx.compile(lambda s: mx.softmax(s, axis=-1))
        ops = {"matmul (975x384 @ 384x1536)": lambda: x @ w, "GELU (975x1536)": lambda: compiled_gelu(h),
               "softmax (25x12x39x39)": lambda: softmax(scores),
               "layer norm (975x384)": lambda: mx.fast.layer_norm(x, scale, bias, 1e-12),
               "add (975x1536)": lambda: h + h}
        sync = mx.eval
    else:
        import torch

        x, w, h, scores = (torch.from_numpy(data[n]) for n in ("x", "w", "h", "scores"))
        scale, bias = torch.ones(384), torch.zeros(384)
        ops = {"matmul (975x384 @ 384x1536)": lambda: x @ w, "GELU (975x1536)": lambda: torch.nn.functional.gelu(h),
               "softmax (25x12x39x39)": lambda: torch.softmax(scores, -1),
               "layer norm (975x384)": lambda: torch.nn.functional.layer_norm(x, (384,), scale, bias, 1e-12),
               "add (975x1536)": lambda: h + h}
        sync = lambda out: None
    results = {}
    for name, op in ops.items():
        sync(op())
        start = time.perf_counter()
        for _ in range(repeats):
            sync(op())
        results[name] = 1e3 * (time.perf_counter() - start) / repeats
    return results


def encoder_workloads(repeats: int, variants: list[str]) -> dict:
    """Each variant and, where PyTorch is installed, its peer, each in a process of its own (peak memory is the
    process's), the peer timed only if its first meta-loss equals ours."""
    def one(variant: str, implementation: str) -> dict:
        done = subprocess.run([sys.executable, __file__, "--encoder-one", variant, implementation, "--repeats",
                               str(repeats)], capture_output=True, text=True)
        if done.returncode != 0:
            return {"failed": f"exit {done.returncode}" + (" (killed: out of memory?)" if done.returncode < 0 else ""),
                    "stderr_tail": done.stderr[-500:]}
        return json.loads(done.stdout.splitlines()[-1])

    results, peers = {}, {}
    for variant in variants:
        results[variant] = ours = one(variant, "mlx")
        peer = PEER_OF.get(variant)
        if peer is None or importlib.util.find_spec("torch") is None:
            continue
        if peer not in peers:
            peers[peer] = one(peer, "pytorch")
        theirs = peers[peer]
        if "failed" in ours or "failed" in theirs:
            ours["pytorch"] = theirs
        elif not np.isclose(theirs["first_loss"], ours["first_loss"], rtol=1e-4):
            ours["pytorch"] = f"refused: its meta-loss {theirs['first_loss']} differs from ours {ours['first_loss']}"
        else:
            ours["pytorch"] = {**theirs, "ours_over_peer": ours["ms_per_iteration"] / theirs["ms_per_iteration"]}
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
    parser.add_argument("--encoder", nargs="?", const=ENCODER_DEFAULT, default=None, metavar="VARIANTS",
                        help=f"instead: these of {list(ENCODER_VARIANTS)} (default {ENCODER_DEFAULT}) + LoRA on "
                        "model=hf_encoder")
    args = parser.parse_args(argv)
    for option, names, valid in (("--workloads", args.workloads, WORKLOADS),
                                 ("--encoder", args.encoder, ENCODER_VARIANTS)):
        if unknown := sorted(set((names or "").split(",")) - set(valid) - {""}):
            parser.error(f"{option}: unknown {unknown}; valid: {','.join(valid)}")
    register_configs()
    if args.runs:
        results = run_breakdown(args.out.parent / "runs")
        io.write_json(args.out.with_name("bench_runs.json"), {"blas": blas.status(), "runs": results,
                                                              "overrides": RUNS})
        print_breakdown(results)
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
        parts = evaluation_parts(overrides)
        io.write_json(args.out.with_name("bench_evaluation.json"), {"overrides": overrides, "seconds": parts})
        for name, per_k in parts.items():
            print(f"{name:32s} " + "  ".join(f"K={k}: {v:6.2f} s" for k, v in per_k.items())
                  + f"  total {sum(per_k.values()):6.2f} s")
        return 0
    if args.start_up:
        result = start_up(args.repeats, args.out.parent / "runs")
        io.write_json(args.out.with_name("bench_start_up.json"), result)
        print(f"to the first meta-iteration {result['to_first_iteration_seconds']:.2f} s, import mlx.core, hydra "
              f"{result['import_mlx_hydra_seconds']:.2f} s: {result['ratio']:.2f}x (medians of {args.repeats})")
        parts = result["parts"]
        print(f"the runner up to its run: {parts['process_to_run_s']:.2f} s from the process's start; in it, Python "
              f"and imports {parts['python_and_imports_s']:.2f} s, Hydra's composition {parts['compose_s']:.2f} s "
              f"({parts['compositions']:.0f} compositions), MLX and the BLAS {parts['load_mlx_and_blas_s']:.2f} s")
        return 0
    if args.start_up_parts:
        start_up_parts(args.start_up_parts)  # prints its parts and ends the process where the run would begin
        return 1  # reached only if the runner stopped before its run
    if args.encoder_ops_one:
        print(json.dumps(encoder_ops(args.encoder_ops_one)))
        return 0
    if args.encoder_ops:
        both = {impl: json.loads(subprocess.run([sys.executable, __file__, "--encoder-ops-one", impl], check=True,
                                                capture_output=True, text=True).stdout.splitlines()[-1])
                for impl in ("mlx", "pytorch")}
        io.write_json(args.out.with_name("bench_encoder_ops.json"), both)
        for name, ours in both["mlx"].items():
            theirs = both["pytorch"][name]
            print(f"{name:30s} MLX {ours:7.2f} ms, PyTorch {theirs:7.2f} ms: {ours / theirs:5.2f}x")
        return 0
    if args.encoder_one:
        print(json.dumps(encoder_one(*args.encoder_one, args.repeats)))
        return 0
    if args.encoder:
        results = encoder_workloads(args.repeats, args.encoder.split(","))
        io.write_json(args.out.with_name("bench_encoder.json"), {"blas": blas.status(), "workloads": results,
                                                                 "overrides": ENCODER})
        for name, r in results.items():
            if "failed" in r:
                print(f"encoder {name:32s} failed: {r['failed']}")
                continue
            peer = r.get("pytorch")
            versus = (f"; PyTorch {peer['ms_per_iteration']:.0f} ms, {peer['max_rss_mb']:.0f} MB RSS: "
                      f"{peer['ours_over_peer']:.2f}x" if isinstance(peer, dict) and "ms_per_iteration" in peer
                      else f"; PyTorch: {peer}" if peer else "")
            print(f"encoder {name:32s} {r['ms_per_iteration']:8.0f} ms per iteration, MLX peak "
                  f"{r['mlx_peak_mb']:6.0f} MB, {r['max_rss_mb']:6.0f} MB RSS{versus}")
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
