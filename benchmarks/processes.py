"""Meta-iterations per second of one run on 1 and on N processes (``mlx.launch --backend ring`` on this machine),
each workload started as a user starts it, both process counts in one invocation so that they share the machine's
load. The speed is ``train.seconds_per_iteration`` of the run's metrics.json (the first iteration, with its
compilation, left out); evaluation is cut to a few tasks and no baselines, as it is not what is timed."""
from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from benchmarks.common import PYTHON, RUNNER
from metapeft import io

LAUNCH = str(Path(PYTHON).parent / "mlx.launch")
NOT_TIMED = ["mode.num_eval_tasks=4", "shots.eval=[5]", "baselines=[]", "mode.num_val_tasks=4", "progress=false",
             "mode.pretrain_iterations=200"]
WORKLOADS = {  # name -> (overrides, meta-iterations)
    "a_sinusoid_maml": (["task=sinusoid", "mode=quick"], 300),
    "c_digits_transformer_lora": (["task=digits", "peft=lora", "mode=quick"], 100),
    "minilm_lora_fomaml": (["model=hf_encoder", "task=text", "peft=lora", "algorithm=fomaml", "mode=quick",
                            "algorithm.tasks_per_pass=null"], 8),  # each process's tasks vmapped, as first measured
    "minilm_lora_maml_checkpointed": (["model=hf_encoder", "task=text", "peft=lora", "algorithm=maml", "mode=quick",
                                       "algorithm.checkpoint_inner_steps=true", "algorithm.tasks_per_pass=1"], 8),
}


def ring_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def seconds_per_iteration(processes: int, overrides: list[str], iterations: int, run_dir: Path) -> float:
    command = [PYTHON, RUNNER] if processes == 1 else \
        [LAUNCH, "-n", str(processes), "--backend", "ring", "-p", str(ring_port()), "--", PYTHON, RUNNER]
    subprocess.run([*command, *overrides, *NOT_TIMED, f"mode.num_iterations={iterations}",
                    f"mode.val_interval={iterations}", f"hydra.run.dir={run_dir}"], check=True, capture_output=True)
    return io.read_json(run_dir / "metrics.json")["train"]["seconds_per_iteration"]


def scaling(names: list[str], processes: int, out_dir: Path) -> dict:
    results = {}
    for name in names:
        overrides, iterations = WORKLOADS[name]
        one = seconds_per_iteration(1, overrides, iterations, out_dir / name / "1")
        many = seconds_per_iteration(processes, overrides, iterations, out_dir / name / str(processes))
        speed_up = one / many
        results[name] = {"overrides": overrides, "iterations": iterations, "processes": processes,
                         "iterations_per_second": {"1": 1 / one, str(processes): 1 / many},
                         "speed_up": speed_up, "efficiency": speed_up / processes}
    return results


def print_scaling(results: dict) -> None:
    print(f"{'workload':32s} {'it/s, 1 process':>16s} {'it/s, N':>10s} {'N':>3s} {'speed-up':>9s} {'efficiency':>10s}")
    for name, r in results.items():
        n = str(r["processes"])
        print(f"{name:32s} {r['iterations_per_second']['1']:16.3f} {r['iterations_per_second'][n]:10.3f} {n:>3s} "
              f"{r['speed_up']:9.2f} {r['efficiency']:10.2f}")
