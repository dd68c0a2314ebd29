"""The Hydra runner end to end: the files of a run, bad input, divergence, reproducibility."""
from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pandas as pd
import pytest
import yaml
from hydra.errors import ConfigCompositionException

from helpers import REPO, run_cli
from metapeft.build import build
from metapeft.errors import ConfigError
from metapeft.experiment import run
from metapeft.io import load_tree
from metapeft.stats import ci95_method
from metapeft.train import MetaTraining, TrainLog, meta_train

TINY = ["mode=tiny", "progress=false"]


def test_a_run_writes_metrics_history_and_checkpoint(tmp_path):
    result = run_cli(f"hydra.run.dir={tmp_path}", *TINY, "algorithm=metasgd", "task=sinusoid", "shots=10shot",
                     "algorithm.inner_lr=0.02", "seed=3")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["identity"] == {
        "algorithm": "metasgd", "peft": "none", "shots": "10shot", "mode": "tiny", "task": "sinusoid", "model": "mlp",
        "seed": 3, "overrides": [*TINY, "algorithm=metasgd", "task=sinusoid", "shots=10shot",
                                 "algorithm.inner_lr=0.02", "seed=3"]}
    evaluation = metrics["evaluation"]
    assert set(evaluation["shots"]) == {"1", "5", "10"} and evaluation["metric"] == "mse"
    for k in evaluation["shots"].values():
        assert set(k["baselines"]) == {"zero", "support_mean", "linear_probe", "plain_init", "finetune",
                                       "finetune_head"}
        for side in (k["meta_learned"], *k["baselines"].values()):
            assert side["num_tasks"] == 6 and side["ci95"] > 0
        for side in (k["meta_learned"], k["baselines"]["plain_init"]):  # the adaptation curves
            assert len(side["curve_mean"]) == 11
    assert metrics["parameters"] == {"total": 1761, "adapted": 1761, "meta_learned": 2 * 1761, "reduction_ratio": 1.0,
                                     "adapter_bytes": 4 * 1761, "meta_learned_bytes": 8 * 1761}
    assert metrics["train"]["iterations"] == 10 and metrics["train"]["seconds_per_iteration"] > 0
    assert metrics["memory"]["max_rss_mb"] > 0
    assert metrics["device"] == ("gpu" if mx.is_available(mx.gpu) else "cpu")  # device=auto: the best available
    if sys.platform.startswith("linux"):  # a single run keeps MLX's stream thread on the main thread's core
        assert metrics["cpu_affinity"]["colocated"] is True
        assert metrics["machine"]["processor"] not in ("", "unknown")  # timings name the processor they came from
    assert metrics["machine"]["cores"] == os.cpu_count()  # the machine's, though the run pins its main thread
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history.iteration) == list(range(10)) and history.val_metric.notna().sum() == 3
    meta = load_tree(tmp_path / "checkpoint" / "meta.safetensors")
    assert set(meta) == {"weights", "lr"} and meta["weights"]["hidden"][0]["weight"].shape == (1, 40)
    assert yaml.safe_load((tmp_path / "checkpoint" / "config.yaml").read_text())["algorithm"]["inner_lr"] == 0.02
    assert (tmp_path / ".hydra" / "overrides.yaml").exists()


@pytest.mark.parametrize("override, message", [("shots.train=0", "shots.train"),
                                               ("task.n_way=40", "task.n_way")])
def test_bad_values_exit_nonzero_naming_the_key(tmp_path, override, message):
    overrides = ["task=digits", override] if override.startswith("task.") else [override]
    result = run_cli(f"hydra.run.dir={tmp_path}", *TINY, *overrides)
    assert result.returncode == 2
    assert message in result.stderr + result.stdout
    assert not (tmp_path / "history.csv").exists()  # nothing trained
    assert json.loads((tmp_path / "metrics.json").read_text())["config_key"] == message


def test_unknown_option_exits_nonzero_listing_valid_ones(tmp_path):
    result = run_cli(f"hydra.run.dir={tmp_path}", "algorithm=mamll")
    assert result.returncode != 0 and "Available options" in result.stderr and "maml" in result.stderr


def test_a_diverging_run_stops_and_keeps_its_history(tmp_path):
    result = run_cli(f"hydra.run.dir={tmp_path}", *TINY, "algorithm.inner_lr=1e30")
    assert result.returncode == 3
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["diverged_at_iteration"] == 0
    assert len(pd.read_csv(tmp_path / "history.csv")) == 1


def test_same_seed_same_metrics(compose_cfg, tmp_path):
    cfg = compose_cfg(*TINY, "task=digits", "algorithm=fomaml")
    first, second = run(cfg, tmp_path / "a"), run(cfg, tmp_path / "b")
    assert first["evaluation"] == second["evaluation"]
    five_shot = first["evaluation"]["shots"]["5"]
    assert five_shot["ci95_method"] == ci95_method(np.array(five_shot["task_sources"]))
    assert 1 <= five_shot["num_distinct_class_sets"] <= 21  # 5-way sets of 7 meta-test classes
    assert len(five_shot["task_sources"]) == len(five_shot["meta_learned"]["per_task"])
    assert first["train"]["final_loss"] == second["train"]["final_loss"]
    a, b = (load_tree(tmp_path / d / "checkpoint" / "meta.safetensors") for d in "ab")
    assert mx.array_equal(a["weights"]["hidden"][0]["weight"], b["weights"]["hidden"][0]["weight"]).item()
    other = run(compose_cfg(*TINY, "task=digits", "algorithm=fomaml", "seed=1"), tmp_path / "c")
    assert other["evaluation"] != first["evaluation"]


def test_keep_best_val_saves_and_evaluates_the_best_validated_parameters(compose_cfg, tmp_path):
    short = ["mode.num_iterations=120", "mode.val_interval=10", "mode.num_eval_tasks=10"]
    best = run(compose_cfg(*short, "keep=best_val"), tmp_path / "best")
    history = pd.read_csv(tmp_path / "best" / "history.csv").dropna(subset=["val_metric"])
    lowest = history.loc[history.val_metric.idxmin()]  # sinusoid: MSE, lower is better
    assert best["train"]["kept_iteration"] == int(lowest.iteration)
    assert best["train"]["kept_val_metric"] == pytest.approx(lowest.val_metric)
    # The checkpoint holds the kept parameters: re-validating it gives the kept metric, not the last one.
    reloaded = run(compose_cfg("train=false", f"checkpoint={tmp_path / 'best'}"), tmp_path / "reloaded",
                   overrides=["train=false", f"checkpoint={tmp_path / 'best'}"])
    assert reloaded["train"]["final_val_metric"] == pytest.approx(best["train"]["kept_val_metric"], rel=1e-6)
    last = run(compose_cfg(*short), tmp_path / "last")
    assert last["train"]["kept_iteration"] == 119
    assert last["train"]["kept_val_metric"] == last["train"]["final_val_metric"]


def test_patience_stops_training_after_that_many_validations_without_improvement(compose_cfg, tmp_path):
    # An Adam step of 1e-20 is below float32 resolution: the meta-parameters never move, so no later validation
    # is (strictly) better than the first.
    stalled = ["mode.num_iterations=1000", "mode.val_interval=10", "mode.num_eval_tasks=10", "algorithm.outer_lr=1e-20",
               "keep=best_val"]
    metrics = run(compose_cfg(*stalled, "patience=3"), tmp_path / "stalled")
    assert metrics["train"]["stopped_early"] and metrics["train"]["kept_iteration"] == 0
    assert metrics["train"]["iterations"] == 31  # validations at 0 (kept), 10, 20, 30: three without improvement
    assert len(pd.read_csv(tmp_path / "stalled" / "history.csv")) == 31
    # A run that keeps improving is not stopped: the validation MSE falls at every check of a short sinusoid run.
    learning = run(compose_cfg("mode.num_iterations=40", "mode.val_interval=10", "mode.num_eval_tasks=10",
                               "keep=best_val", "patience=1", "algorithm.outer_lr=0.01"), tmp_path / "learning")
    assert learning["train"]["iterations"] == 40 and not learning["train"]["stopped_early"]


def test_validations_before_keep_from_are_recorded_but_neither_kept_nor_counted(compose_cfg):
    exp = build(compose_cfg())
    meta = exp.learner.meta_parameters(exp.model.init(mx.random.key(0)))
    episodes = exp.task.sample("train", 2, 5, np.random.default_rng(0))
    log = TrainLog()
    # The validation metric (MSE, lower is better) worsens with every check, so the earliest check is the best.
    meta_train(exp.learner, meta, {}, MetaTraining(lambda: episodes, num_iterations=100,
                                                   validate=lambda m, f: float(len(log.rows)), val_interval=5,
                                                   progress=False, better=lambda new, old: new < old, patience=3,
                                                   keep_from=22), log)
    assert log.kept_iteration == 25  # the first check at or after keep_from, though checks 0..20 scored better
    assert log.iterations == 41 and log.stopped_early  # checks 30, 35, 40 without improvement; 0..20 not counted
    assert pd.DataFrame(log.rows).val_metric.notna().sum() == 9  # every check recorded


def test_patience_needs_keep_best_val_and_a_positive_count(compose_cfg, tmp_path):
    for overrides in (["patience=5"], ["keep=best_val", "patience=0"]):
        with pytest.raises(ConfigError) as error:
            run(compose_cfg(*overrides), tmp_path)
        assert error.value.key == "patience"


def test_keep_must_be_last_or_best_val_at_composition(compose_cfg):
    with pytest.raises(ConfigCompositionException, match="keep") as error:
        compose_cfg("keep=best")
    assert "last" in str(error.value.__cause__) and "best_val" in str(error.value.__cause__)


@pytest.mark.parametrize("override, key", [("seed=-1", "seed"), ("seed=99999999999999999999", "seed"),
                                           ("algorithm.num_inner_steps=-1", "algorithm.num_inner_steps")])
def test_impossible_values_name_the_key_the_user_set(compose_cfg, tmp_path, override, key):
    with pytest.raises(ConfigError) as error:
        run(compose_cfg("mode=tiny", override), tmp_path)
    assert error.value.key == key


def test_result_files_are_readable_by_others_under_the_usual_umask(compose_cfg, tmp_path):
    old = os.umask(0o022)
    try:
        run(compose_cfg("mode=tiny"), tmp_path)
    finally:
        os.umask(old)
    for name in ("metrics.json", "history.csv", "checkpoint/meta.safetensors", "checkpoint/config.yaml"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_time_per_iteration_leaves_out_the_first_iterations_compilation(compose_cfg, tmp_path):
    # Arithmetic only: whether compiling makes the first iteration slower is a timing, and timings on a
    # loaded 2-core machine do not order reliably (CI once saw 8.48 ms first against 8.63 ms per iteration).
    train = run(compose_cfg("mode=tiny"), tmp_path)["train"]
    rest = train["train_seconds"] - train["first_iteration_seconds"]
    assert 0 < train["first_iteration_seconds"] < train["train_seconds"]
    assert train["seconds_per_iteration"] == pytest.approx(rest / (train["iterations"] - 1))


@pytest.mark.parametrize("stop, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_a_run_and_keeps_its_files(tmp_path, stop, code):
    """SIGTERM (what Slurm sends on timeout or preemption) or Ctrl-C: `interrupted`, the history kept, 143 / 130."""
    job = subprocess.Popen([sys.executable, "runners/run.py", f"hydra.run.dir={tmp_path}", "progress=false",
                            "mode.num_iterations=1000000"], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while "thread placement" not in "".join(p.read_text() for p in tmp_path.glob("run.log")) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # well into meta-training (sinusoid + MLP: nothing to pretrain first)
    job.send_signal(stop)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == code and "Traceback" not in stderr, stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and stop.name in metrics["reason"]
    history = pd.read_csv(tmp_path / "history.csv")
    assert len(history) == metrics["interrupted_at_iteration"] > 0


def stopped_by_sigterm(run_dir, args, saved: str) -> dict:
    """The runner started into ``run_dir`` and sent SIGTERM once it has written ``checkpoint/<saved>``: it exits 143
    with status interrupted. Its metrics."""
    job = subprocess.Popen([sys.executable, "runners/run.py", f"hydra.run.dir={run_dir}", *args],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "checkpoint" / saved).exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    job.send_signal(signal.SIGTERM)
    job.communicate(timeout=120)
    stopped = json.loads((run_dir / "metrics.json").read_text())
    assert job.returncode == 143 and stopped["status"] == "interrupted", stopped.get("reason")
    return stopped


def resumed_and_straight(tmp_path, args) -> tuple:
    """``tmp_path/stopped`` resumed with ``resume=true``, and the same run uninterrupted in ``tmp_path/straight``:
    the resumed process, then both runs' metrics and histories."""
    resumed = run_cli(f"hydra.run.dir={tmp_path / 'stopped'}", *args, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = run_cli(f"hydra.run.dir={tmp_path / 'straight'}", *args)
    assert straight.returncode == 0, straight.stderr[-2000:]
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("stopped", "straight")]
    histories = [pd.read_csv(tmp_path / d / "history.csv") for d in ("stopped", "straight")]
    return resumed, metrics, histories


@pytest.mark.parametrize("workload", [
    ["mode.num_iterations=1500", "mode.val_interval=100", "mode.num_eval_tasks=20"],  # MAML on sinusoid
    pytest.param(["task=digits", "peft=lora", "mode.num_iterations=300", "mode.val_interval=20",
                  "pretrain.iterations=20", "mode.num_eval_tasks=6", "shots.eval=[5]"], marks=pytest.mark.slow),
], ids=["sinusoid", "lora"])
def test_an_interrupted_run_resumes_where_it_stopped_and_ends_as_if_never_stopped(tmp_path, workload):
    args = ["progress=false", "keep=best_val", f"pretrain.cache_dir={tmp_path / 'cache'}", *workload]
    # stopped at the first saved training state (iteration 100) or a little after: 1,400 iterations before the end
    stopped = stopped_by_sigterm(tmp_path / "stopped", args, "training.json")
    _, (a, b), (history_a, history_b) = resumed_and_straight(tmp_path, args)
    assert 0 < a["train"]["resumed_from_iteration"] <= stopped["interrupted_at_iteration"]  # it went on, not over
    assert a["status"] == "completed" and a["evaluation"] == b["evaluation"]
    assert a["train"]["kept_iteration"] == b["train"]["kept_iteration"]
    pd.testing.assert_frame_equal(history_a, history_b)
    assert not (tmp_path / "stopped" / "checkpoint" / "training.json").exists()  # nothing left to resume


def every_file(directory) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_refused_resume_keeps_the_interrupted_runs_record(tmp_path):
    args = ["progress=false", "mode.num_iterations=1500", "mode.val_interval=100", "mode.num_eval_tasks=20"]
    stopped_by_sigterm(tmp_path / "stopped", args, "training.json")
    before = every_file(tmp_path / "stopped")
    refused = run_cli(f"hydra.run.dir={tmp_path / 'stopped'}", *args, "resume=true", "algorithm.inner_lr=0.02")
    assert refused.returncode == 2 and "holds a interrupted run" not in refused.stderr
    assert "holds an interrupted run made with other overrides (with algorithm.inner_lr=0.02)" in refused.stderr
    after = every_file(tmp_path / "stopped")
    assert json.loads(after.pop(Path("refused.json")))["status"] == "refused"  # written beside the run
    assert after == before  # every file, .hydra/ included, byte for byte


def test_resume_with_other_overrides_into_a_completed_run_is_refused_and_changes_nothing(tmp_path):
    done = run_cli(f"hydra.run.dir={tmp_path}", "mode=tiny", "progress=false")
    assert done.returncode == 0, done.stderr[-2000:]
    before = every_file(tmp_path)
    refused = run_cli(f"hydra.run.dir={tmp_path}", "mode=tiny", "progress=false", "algorithm=reptile", "resume=true")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert "holds a completed run made with other overrides (with algorithm=reptile)" in refused.stderr
    after = every_file(tmp_path)
    after.pop(Path("refused.json"))
    assert after == before
    same = run_cli(f"hydra.run.dir={tmp_path}", "mode=tiny", "progress=false", "resume=true")  # its own overrides
    assert same.returncode == 0 and "already completed with these overrides; skipped" in same.stdout + same.stderr


@pytest.mark.parametrize("argument", ["algorithm=mamll", "seed=abc"])
def test_a_config_hydra_cannot_compose_exits_2_with_hydras_message(tmp_path, argument):
    result = run_cli(f"hydra.run.dir={tmp_path}", argument)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert ("mamll" if "mamll" in argument else "abc") in result.stderr


def test_a_run_stopped_during_evaluation_resumes_there_without_meta_training_again(tmp_path):
    args = ["progress=false", "mode.num_iterations=300", "mode.num_eval_tasks=40"]
    stopped_by_sigterm(tmp_path / "stopped", args, "trained.json")  # meta-training done, evaluation begun
    resumed, (a, b), (history_a, history_b) = resumed_and_straight(tmp_path, args)
    assert "meta-training had finished (300 iterations)" in resumed.stdout + resumed.stderr
    assert a["status"] == "completed" and a["evaluation"] == b["evaluation"]
    assert "meta_training" not in a["seconds"] and a["train"]["resumed_from_iteration"] == 300
    pd.testing.assert_frame_equal(history_a, history_b)
    assert not (tmp_path / "stopped" / "checkpoint" / "trained.json").exists()  # evaluated: nothing left to resume


def test_a_number_for_a_group_option_says_what_to_write_instead(tmp_path):
    result = run_cli(f"hydra.run.dir={tmp_path}", "shots=5")
    assert result.returncode == 2 and "shots=5shot" in result.stderr and "Traceback" not in result.stderr
    assert "20shot" in result.stderr  # every option, read from the configs
    result = run_cli(f"hydra.run.dir={tmp_path}", "shots=3")
    assert result.returncode == 2 and "shots.train=3" in result.stderr


def test_a_relative_checkpoint_path_works_when_hydra_changes_directory(compose_cfg, tmp_path):
    run(compose_cfg("mode=tiny"), tmp_path / "run")
    relative = os.path.relpath(tmp_path / "run", REPO)
    result = run_cli(f"hydra.run.dir={tmp_path / 'eval'}", "hydra.job.chdir=true", "train=false",
                     f"checkpoint={relative}", "progress=false")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("where", ["/proc/metapeft-test", "FILE/below"])
def test_an_output_directory_that_cannot_exist_is_refused_in_one_line(tmp_path, where):
    (tmp_path / "file").write_text("a file, not a folder")
    where = where.replace("FILE", str(tmp_path / "file"))
    result = run_cli(f"hydra.run.dir={where}")
    assert result.returncode == 2 and "hydra.run.dir" in result.stderr and "Traceback" not in result.stderr


def test_a_corrupt_training_state_is_refused_on_resume(compose_cfg, tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "training.json").write_text("{truncated")
    with pytest.raises(ConfigError, match="training state cannot be read") as error:
        run(compose_cfg("mode=tiny", "resume=true"), tmp_path)
    assert error.value.key == "resume"


def test_a_job_requeued_by_slurm_resumes_instead_of_starting_over(tmp_path):
    done = run_cli(f"hydra.run.dir={tmp_path}", "progress=false", "mode=tiny")
    assert done.returncode == 0, done.stderr[-2000:]
    again = subprocess.run([sys.executable, "runners/run.py", f"hydra.run.dir={tmp_path}", "progress=false",
                            "mode=tiny"], cwd=REPO, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "SLURM_RESTART_COUNT": "1"})
    assert again.returncode == 0 and "already completed with these overrides; skipped" in again.stdout, again.stderr


def test_paths_decide_where_runs_and_caches_go(tmp_path):
    result = run_cli("mode=tiny", "progress=false", f"paths.output_dir={tmp_path / 'out'}",
                     f"paths.cache_dir={tmp_path / 'cache'}", "peft=lora", "pretrain.iterations=5")
    assert result.returncode == 0, result.stderr[-2000:]
    (metrics,) = (tmp_path / "out").glob("*/*/metrics.json")
    assert json.loads(metrics.read_text())["pretraining"]["cache_file"].startswith(str(tmp_path / "cache"))


def test_metrics_say_where_a_runs_time_went(tmp_path):
    result = run_cli("mode=tiny", "progress=false", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    seconds = metrics["seconds"]
    # peft=none: the backbone the feature baselines read is recorded, and its time booked as pretraining
    assert "best_iteration" in metrics["pretraining"] and seconds["pretraining_and_initialization"] > 0
    phases = {"start_up", "pretraining_and_initialization", "meta_training", "validation", "training_state_writes",
              "checkpoint_writing", "evaluation", "inference_timing", "writing_results", "other"}
    assert set(seconds) == phases | {"total"}
    assert all(v >= 0 for v in seconds.values()) and seconds["start_up"] > 0 and seconds["meta_training"] > 0
    assert sum(seconds[p] for p in phases) == pytest.approx(seconds["total"], rel=1e-6)


def test_a_quoted_run_directory_is_used_as_hydra_reads_it_and_leaves_nothing_behind(tmp_path):
    where = tmp_path / "é ü" / "run"
    result = subprocess.run([sys.executable, str(REPO / "runners" / "run.py"), f'hydra.run.dir="{where}"', "--cfg",
                             "job"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert where.is_dir() and not [p for p in tmp_path.iterdir() if p.name.startswith(('"', "'"))]


@pytest.mark.parametrize("size", ["64k", "100k"])
def test_a_full_disk_ends_the_run_in_one_line_naming_the_file_and_loses_nothing_written(tmp_path, size):
    """A run into a small tmpfs (mounting one needs root; skipped where it cannot be mounted)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        result = run_cli(f"hydra.run.dir={disk / 'run'}", "mode=tiny", "progress=false")
        console = result.stdout + result.stderr
        assert result.returncode == 4 and "Traceback" not in console, console[-3000:]
        assert re.search(rf"cannot write {re.escape(str(disk / 'run'))}/\S+: no space left on the device", console)
        record = json.loads((disk / "run" / "metrics.json").read_text())
        assert record["status"] == "failed" and "no space left" in record["reason"]  # never left "running"
        assert not list((disk / "run").rglob(".*.tmp")) and not list((disk / "run").rglob(".metrics.*"))
        assert not (disk / "run" / ".metapeft.reserve").exists()
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_run_directory_has_one_writer_at_a_time(tmp_path):
    from metapeft.errors import ConfigError
    from metapeft.experiment import hold_directory

    held = hold_directory(tmp_path)
    with pytest.raises(ConfigError, match="in use by another metapeft process") as error:
        hold_directory(tmp_path)  # as a second process (a resume started beside a job still running) would be
    assert error.value.key == "hydra.run.dir"
    held.close()
    hold_directory(tmp_path).close()  # free again once the holder is done


def test_an_unquoted_value_outside_ascii_is_refused_with_the_quoting_to_use_and_leaves_no_folder(tmp_path):
    where = tmp_path / "résumé"
    result = run_cli(f"hydra.run.dir={where}", "mode=tiny")
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert f"hydra.run.dir='{where}'" in result.stderr and not where.exists()


def test_resume_without_a_run_directory_says_that_it_starts_a_new_one(tmp_path):
    result = run_cli(f"paths.output_dir={tmp_path}", "mode=tiny", "progress=false", "resume=true")
    assert result.returncode == 0 and "resume=true without hydra.run.dir starts a new run directory" in result.stderr
