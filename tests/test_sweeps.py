"""Sweeps through the real runner: parallel jobs, failure isolation, resume, and aggregation."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pandas as pd
import pytest

from helpers import REPO, compose_config, run_cli
from runners.aggregate import main as aggregate

TINY = ["mode=tiny", "evaluation.curve_steps=5", "pretrain.iterations=20", "progress=false"]


def sweep(sweep_dir, *overrides):
    return subprocess.run([sys.executable, "runners/run.py", "--multirun", f"hydra.sweep.dir={sweep_dir}",
                           f"pretrain.cache_dir={sweep_dir.parent / 'cache'}", *TINY, *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def statuses(sweep_dir):
    return sorted(json.loads(p.read_text())["status"] for p in sweep_dir.glob("*/metrics.json"))


def test_a_2x2_parallel_sweep_aggregates(tmp_path):
    result = sweep(tmp_path / "sweep", "hydra/launcher=joblib", "algorithm=maml,reptile", "peft=none,lora",
                   "task=digits")
    assert result.returncode == 0, result.stderr[-3000:]
    assert statuses(tmp_path / "sweep") == ["completed"] * 4
    for metrics in (tmp_path / "sweep").glob("*/metrics.json"):  # side by side, jobs do not pin threads to a core
        assert json.loads(metrics.read_text())["cpu_affinity"] == {"colocated": False, "reason": "parallel sweep job"}
    assert aggregate([str(tmp_path / "sweep"), "--out", str(tmp_path / "report")]) == 0
    table = pd.read_csv(tmp_path / "report" / "comparison.csv")
    assert sorted(zip(table.algorithm, table.peft)) == [("maml", "lora"), ("maml", "none"), ("reptile", "lora"),
                                                        ("reptile", "none")]
    assert table["5-shot"].str.contains("±").all()
    summary = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert len(summary) == 4 and {"override.evaluation.curve_steps", "parameters.adapted"} <= set(summary.columns)
    for plot in ("kshot", "training_curves", "efficiency", "adaptation", "time_per_iteration"):
        assert (tmp_path / "report" / f"digits_{plot}.png").stat().st_size > 0


def test_failed_jobs_are_isolated_listed_and_resumable(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = sweep(sweep_dir, "algorithm=maml,fomaml", "algorithm.inner_lr=0.01,1e30")
    assert result.returncode != 0
    assert statuses(sweep_dir) == ["completed", "completed", "diverged", "diverged"]
    log = result.stdout + result.stderr
    assert log.count("DIVERGED job") == 2 and "algorithm=maml algorithm.inner_lr=1e+30" in log \
        and "algorithm=fomaml algorithm.inner_lr=1e+30" in log
    completed = {p: p.read_text() for p in sweep_dir.glob("*/metrics.json") if '"completed"' in p.read_text()}

    again = sweep(sweep_dir, "algorithm=maml,fomaml", "algorithm.inner_lr=0.01,1e30", "resume=true")
    assert again.returncode != 0  # the diverging jobs were rerun, and diverged again
    assert (again.stdout + again.stderr).count("already completed with these overrides; skipped") == 2
    assert all(p.read_text() == text for p, text in completed.items())  # completed results untouched

    report = aggregate([str(sweep_dir), "--out", str(tmp_path / "report")])
    assert report == 0
    table = pd.read_csv(tmp_path / "report" / "comparison.csv")  # a row per configuration: lr is not pooled
    assert len(table) == 4
    for row in table.itertuples():
        assert row.status == ("completed" if "algorithm.inner_lr=0.01" in row.config else "diverged: 1"), row


def test_aggregating_nothing_fails_clearly(tmp_path, capsys):
    assert aggregate([str(tmp_path)]) == 2
    assert "no runs found" in capsys.readouterr().err
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "metrics.json").write_text('{"accuracy": 1}')
    assert aggregate([str(tmp_path)]) == 2
    assert "not a metapeft metrics file" in capsys.readouterr().err


def test_runs_and_sweeps_started_in_the_same_second_get_different_directories():
    first, second = (compose_config(return_hydra_config=True).hydra for _ in range(2))
    for a, b in ((first.run.dir, second.run.dir), (first.sweep.dir, second.sweep.dir)):
        assert re.fullmatch(r"(outputs|multirun)/\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}-\d{6}", a), a
        assert a != b


def test_a_sweep_with_a_long_override_gets_short_stable_job_directories(tmp_path):
    long = "baselines=[" + "zero,support_mean," * 20 + "zero]"  # the job name would pass 255 bytes
    first = sweep(tmp_path / "sweep", long, "seed=0,1")
    assert first.returncode == 0, first.stderr[-3000:]
    jobs = [p.parent for p in (tmp_path / "sweep").glob("*/metrics.json")]
    assert len(jobs) == 2 and all(len(job.name.encode()) <= 200 for job in jobs)
    again = sweep(tmp_path / "sweep", long, "seed=0,1", "resume=true")
    assert (again.stdout + again.stderr).count("already completed with these overrides; skipped") == 2


@pytest.mark.slow
def test_a_parallel_sweep_prints_how_many_jobs_are_done_and_a_sequential_one_names_each_bar(tmp_path):
    # small jobs, two at a time, each long enough (300 iterations) that the progress line, polled every second,
    # sees the first pair done before the second
    parallel = run_cli("--multirun", "hydra/launcher=joblib", "algorithm=maml,reptile", "seed=0,1", "mode=tiny",
                       "mode.num_iterations=300", f"hydra.sweep.dir={tmp_path / 'parallel'}")
    assert parallel.returncode == 0, parallel.stderr[-2000:]
    console = parallel.stdout + parallel.stderr
    assert re.search(r"sweep: [1-3] of 4 jobs done \(0 failed, \d running\)", console), console[-3000:]
    assert "meta-train algorithm=" not in console  # bars of jobs side by side are off
    sequential = run_cli("--multirun", "algorithm=maml,reptile", "mode=tiny", f"hydra.sweep.dir={tmp_path / 'seq'}")
    assert sequential.returncode == 0, sequential.stderr[-2000:]
    assert "meta-train algorithm=maml mode=tiny" in sequential.stderr
    assert "meta-train algorithm=reptile mode=tiny" in sequential.stderr
    # one process runs both jobs: only the first had a start-up (the second's is not the first job's run time)
    metrics = {job: json.loads((tmp_path / "seq" / f"algorithm={job},mode=tiny" / "metrics.json").read_text())
               for job in ("maml", "reptile")}
    start_up = {job: m["seconds"]["start_up"] for job, m in metrics.items()}
    assert start_up["maml"] > 0 and start_up["reptile"] == 0, start_up
    # the time a user waits for the first meta-iteration: from the process's start, so the first job's alone
    assert metrics["maml"]["train"]["seconds_to_first_iteration"] > start_up["maml"]
    assert metrics["reptile"]["train"]["seconds_to_first_iteration"] is None


def test_sigterm_to_a_parallel_sweep_stops_its_workers_and_records_every_running_job(tmp_path):
    """What a scheduler does: SIGTERM to the sweep's main process alone. Its joblib workers are stopped (none
    outlives it), each running job's metrics.json says interrupted with its training state kept, and the main
    process exits 143 saying so; resume=true then goes on."""
    import signal
    import time

    sweep = tmp_path / "sweep"
    command = [sys.executable, "runners/run.py", "--multirun", "seed=0,1", "mode.num_iterations=100000",
               "mode.val_interval=50", "hydra/launcher=joblib", f"hydra.sweep.dir={sweep}"]
    output = open(tmp_path / "output.txt", "w+")  # a file, not a pipe nobody reads while the sweep runs
    main = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while len(list(sweep.glob("*/checkpoint/training.json"))) < 2 and time.monotonic() < deadline and \
            main.poll() is None:
        time.sleep(0.5)  # both jobs are training: each has saved a training state
    children = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(main.pid)], capture_output=True,
                              text=True)
    workers = [int(line.split()[0]) for line in children.stdout.splitlines() if "popen_loky" in line]
    assert len(workers) == 2
    main.send_signal(signal.SIGTERM)
    main.wait(timeout=180)
    text = (tmp_path / "output.txt").read_text()
    assert main.returncode == 143, text[-2000:]
    assert "sweep stopped by SIGTERM" in text
    jobs = sorted(sweep.glob("*seed=*"))
    assert len(jobs) == 2
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["status"] == "interrupted" and metrics["reason"] == "stopped by SIGTERM"
        assert (job / "checkpoint" / "training.safetensors").exists()
    for pid in workers:
        assert subprocess.run(["ps", "-p", str(pid)], capture_output=True).returncode != 0, f"{pid} outlived it"


def test_the_progress_line_counts_interrupted_jobs_apart_from_failed_ones(tmp_path):
    from metapeft.sweep import SweepProgress

    for name, status in (("a", "completed"), ("b", "interrupted"), ("c", "failed"), ("d", "running")):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / "metrics.json").write_text(json.dumps({"status": status}))
    line = SweepProgress(tmp_path).line()
    assert "3 of ? jobs done (1 failed, 1 interrupted, 1 running)" in line


def test_a_path_valued_override_neither_names_a_job_nor_labels_its_configuration():
    from omegaconf import OmegaConf

    from metapeft.config import register_configs
    from metapeft.report import config_label
    from metapeft.sweep import identifying

    overrides = ["paths.multirun_dir=/x/y", "pretrain.cache_dir=/c", "algorithm.inner_lr=0.1", "seed=1"]
    assert identifying(overrides) == ["algorithm.inner_lr=0.1", "seed=1"]
    assert config_label(overrides) == "algorithm.inner_lr=0.1"
    register_configs()
    excluded = OmegaConf.create({"excluded": "${job_dirname_excluded_keys:}"}).excluded
    assert "paths.multirun_dir" in excluded and "paths.output_dir" in excluded  # Hydra matches whole keys


def test_a_stopped_sweep_leaves_no_job_running_that_no_process_holds(tmp_path):
    import fcntl

    from metapeft.sweep_stop import record_unfinished

    for name, status in (("orphan", "running"), ("held", "running"), ("done", "completed")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"status": status, "identity": {}}))
    with open(tmp_path / "held" / ".metapeft.lock", "w") as lock:  # a job still writing its own record
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert record_unfinished(tmp_path) == [tmp_path / "orphan"]
    statuses = {name: json.loads((tmp_path / name / "metrics.json").read_text())["status"]
                for name in ("orphan", "held", "done")}
    assert statuses == {"orphan": "interrupted", "held": "running", "done": "completed"}
