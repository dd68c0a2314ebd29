"""One run on several processes (``mlx.launch``, MLX's ring backend on 127.0.0.1): the same evaluation as one
process to float32 summation order, one run directory, and the shares and gathers it is built from."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, run_cli
from metapeft import distributed
from metapeft.errors import ConfigError

LAUNCH = Path(sys.executable).parent / "mlx.launch"


def free_port() -> int:
    """A starting port for the ring (it takes this one and the next): test workers launch side by side."""
    while True:
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
        with socket.socket() as second:
            try:
                second.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def launched(processes: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(LAUNCH), "-n", str(processes), "--backend", "ring", "-p", str(free_port()), "--",
                           sys.executable, "runners/run.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed beside this Python")
@pytest.mark.parametrize("overrides", [
    ["task=sinusoid", "algorithm.meta_batch_size=5"],  # 5 tasks on 2 processes: shares of 3 and 2
    ["task=digits", "peft=lora", "mode.pretrain_iterations=30", "baselines=[linear_probe]"],
], ids=["maml-sinusoid", "maml-lora-digits"])
def test_two_processes_evaluate_as_one(tmp_path, overrides):
    common = [*overrides, "mode=tiny", "mode.num_iterations=12", "mode.val_interval=5", "mode.num_eval_tasks=12",
              "shots.eval=[5]", "progress=false", f"pretrain.cache_dir={tmp_path / 'cache'}"]
    one = run_cli(*common, f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-2000:]
    two = launched(2, *common, f"hydra.run.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-2000:] + two.stdout[-2000:]
    first, second = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "two"))
    assert second["status"] == "completed" and second["train"]["iterations"] == 12
    assert (first["processes"], second["processes"]) == (1, 2)  # the record says how the run was split
    ours = [np.array(m["evaluation"]["shots"]["5"]["meta_learned"]["per_task"]) for m in (first, second)]
    np.testing.assert_allclose(ours[1], ours[0], rtol=1e-4, atol=1e-5)  # float32 summation order only
    for name, baseline in first["evaluation"]["shots"]["5"]["baselines"].items():
        assert second["evaluation"]["shots"]["5"]["baselines"][name]["per_task"] == baseline["per_task"], name
    np.testing.assert_allclose(second["train"]["final_loss"], first["train"]["final_loss"], rtol=1e-4)
    assert (tmp_path / "two" / ".hydra" / "config.yaml").is_file()  # one run directory, the first process's


def test_a_sweep_under_mlx_launch_is_refused(monkeypatch):
    monkeypatch.setenv(distributed.LAUNCHED, "0")
    from metapeft.cli.run import distributed_arguments

    with pytest.raises(SystemExit) as exit_:
        distributed_arguments(["--multirun", "seed=0,1"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("processes, expected", [
    (1, [(0, 7)]), (2, [(0, 4), (4, 7)]), (3, [(0, 3), (3, 5), (5, 7)]),
])
def test_shares_cover_the_batch_once(monkeypatch, processes, expected):
    monkeypatch.setattr(distributed, "size", lambda: processes)
    shares = []
    for rank in range(processes):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        shares.append(distributed.share(7))
    assert shares == expected


def test_a_meta_batch_smaller_than_the_processes_is_refused_naming_the_key(compose_cfg, tmp_path, monkeypatch):
    from metapeft.build import build
    from metapeft.experiment import train_and_evaluate
    from metapeft.train import TrainLog

    monkeypatch.setattr(distributed, "size", lambda: 8)
    exp = build(compose_cfg("task=sinusoid", "mode=tiny", "algorithm.meta_batch_size=4"))
    with pytest.raises(ConfigError, match="algorithm.meta_batch_size.*number of processes"):
        train_and_evaluate(exp, tmp_path, TrainLog())


def test_a_process_that_loses_its_peer_records_the_run_as_interrupted(compose_cfg, tmp_path, monkeypatch):
    """SIGTERM to one process of a launch: the others get MLX's "[ring] connection to a peer was lost" at their next
    all_sum; rank 0 records interrupted (resumable), not failed."""
    import metapeft.experiment as experiment
    from metapeft.errors import Interrupted

    def lost(*args, **kwargs):
        raise RuntimeError("[ring] connection to a peer was lost")

    monkeypatch.setattr(distributed, "size", lambda: 2)
    monkeypatch.setattr(experiment, "train_and_evaluate", lost)
    with pytest.raises(Interrupted):
        experiment.run(compose_cfg("task=sinusoid", "mode=tiny"), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and "another process of this run stopped" in metrics["reason"]
    monkeypatch.setattr(distributed, "size", lambda: 1)  # one process: the same error is a failure
    with pytest.raises(RuntimeError):
        experiment.run(compose_cfg("task=sinusoid", "mode=tiny"), tmp_path / "alone")
    assert json.loads((tmp_path / "alone" / "metrics.json").read_text())["status"] == "failed"
