"""Where whole runs spend their time: the phases of quick runs as users start them (``runs``), the
seconds to the first meta-iteration against importing MLX and Hydra alone, and their parts (``start-up``), and
each part of a run's evaluation (``evaluation``). ``python -m benchmarks`` is the command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.common import PYTHON, RUNNER, compose_workload, in_own_process
from metapeft import affinity, io
from metapeft.backend import mx
from metapeft.build import build
from metapeft.tasks.base import Episodes

# Whole runs whose time the runs subcommand splits into phases (metrics.json "seconds"), quick mode.
RUNS = {
    "sinusoid_maml_mlp": [],
    "digits_maml_mlp": ["task=digits"],
    "digits_maml_lora": ["task=digits", "peft=lora"],
    "digits_maml_adalora": ["task=digits", "peft=adalora"],
    "digits_maml_prompt_tuning": ["task=digits", "peft=prompt_tuning"],
}


def run_as_a_user(run_dir: Path, *overrides: str) -> dict:
    """``python runners/run.py OVERRIDES`` in a process of its own, into ``run_dir``: its metrics.json."""
    subprocess.run([PYTHON, RUNNER, *overrides, "progress=false", f"hydra.run.dir={run_dir}"], check=True,
                   capture_output=True)
    return io.read_json(run_dir / "metrics.json")


def run_breakdown(out_dir: Path) -> dict:
    """Each quick run of RUNS, started as a user starts it, and the seconds it spent per phase."""
    results = {}
    for name, overrides in RUNS.items():
        started = time.perf_counter()
        seconds = run_as_a_user(out_dir / name, *overrides)["seconds"]
        seconds["wall_from_outside"] = time.perf_counter() - started
        results[name] = seconds
    return results


# The same clock for both sides: seconds from the process's start (/proc), read where each is done.
IMPORTS_ONLY = ("import os, mlx.core, hydra; "
                "ticks = int(open('/proc/self/stat').read().rsplit(')', 1)[1].split()[19]); "
                "print(float(open('/proc/uptime').read().split()[0]) - ticks / os.sysconf('SC_CLK_TCK'))")


def start_up_parts(run_dir: Path) -> None:
    """The runner, in this process, stopped where its run would begin: seconds since the process started, and the
    time inside Hydra's composition and in loading MLX and the BLAS on the way (``start-up`` runs this alone, in a
    process of its own)."""
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
    runpy.run_path(RUNNER, run_name="__main__")


def start_up(repeats: int, out_dir: Path) -> dict:
    """Seconds from process start to the first meta-iteration of the default job (mode=tiny), against the
    seconds to ``import mlx.core, hydra`` alone; medians of ``repeats`` alternating runs."""
    imports, runner = [], []
    for repeat in range(repeats):
        done = subprocess.run([PYTHON, "-c", IMPORTS_ONLY], check=True, capture_output=True, text=True)
        imports.append(float(done.stdout))
        metrics = run_as_a_user(out_dir / f"start_up_{repeat}", "mode=tiny")
        runner.append(metrics["train"]["seconds_to_first_iteration"])
    result = {"import_mlx_hydra_seconds": float(np.median(imports)), "to_first_iteration_seconds":
              float(np.median(runner)), "all_imports": imports, "all_runner": runner}
    result["ratio"] = result["to_first_iteration_seconds"] / result["import_mlx_hydra_seconds"]
    parts = [json.loads(subprocess.run(in_own_process("runs", "start-up-parts", str(out_dir / "parts")),
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


def print_start_up(result: dict, repeats: int) -> None:
    print(f"to the first meta-iteration {result['to_first_iteration_seconds']:.2f} s, import mlx.core, hydra "
          f"{result['import_mlx_hydra_seconds']:.2f} s: {result['ratio']:.2f}x (medians of {repeats})")
    parts = result["parts"]
    print(f"the runner up to its run: {parts['process_to_run_s']:.2f} s from the process's start; in it, Python "
          f"and imports {parts['python_and_imports_s']:.2f} s, Hydra's composition {parts['compose_s']:.2f} s "
          f"({parts['compositions']:.0f} compositions), MLX and the BLAS {parts['load_mlx_and_blas_s']:.2f} s")


def evaluation_parts(overrides: list[str], repeats: int = 2) -> dict:
    """Seconds of each part of a run's evaluation (``metapeft.evaluate.evaluate_shots``) at every K: the meta-learned
    model's adaptation curves, as the runner computes them (vmapped) and compiled (``mx.compile`` over the same
    vmapped function, the meta-parameters as inputs), and each baseline; the last of ``repeats`` timings each."""
    from metapeft.baselines import make_baselines
    from metapeft.build import initial_state, pretrained
    from metapeft.evaluate import curves_over_tasks, learner_curves

    cfg = compose_workload(overrides)
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
            for _ in range(repeats):
                # a new episodes object each repeat: the baselines cache the features of the last episodes they saw
                # (prototype computes the pretrained features, linear_probe reuses them, as in a run)
                fresh = Episodes(*episodes)
                for name, part in parts.items():
                    began = time.perf_counter()
                    part(fresh)
                    results.setdefault(name, {})[str(k)] = time.perf_counter() - began
    return results


def print_evaluation(parts: dict) -> None:
    for name, per_k in parts.items():
        print(f"{name:32s} " + "  ".join(f"K={k}: {v:6.2f} s" for k, v in per_k.items())
              + f"  total {sum(per_k.values()):6.2f} s")


if __name__ == "__main__":
    # python -m benchmarks.runs start-up-parts RUN_DIR: the start-up parts of one runner process (start_up's repeats)
    if sys.argv[1:2] != ["start-up-parts"] or len(sys.argv) != 3:
        sys.exit("usage: python -m benchmarks.runs start-up-parts RUN_DIR")
    start_up_parts(Path(sys.argv[2]))  # prints its parts and ends the process where the run would begin
    sys.exit(1)  # reached only if the runner stopped before its run
