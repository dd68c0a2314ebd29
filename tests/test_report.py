"""Aggregation never pools unlike runs, flags duplicated seeds, lists every unreadable file and counts missing jobs."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import yaml

from metapeft.report import ReportError, collect, comparison, with_ci, write_report
from metapeft.stats import mean_ci95


def fake_job(directory, overrides, seed, ours, nearest, status="completed", k="5", classes=None):
    """A job directory as the runner writes it, with per-task values ``ours`` and a nearest_centroid baseline."""
    (directory / ".hydra").mkdir(parents=True)
    (directory / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, f"seed={seed}"]))
    identity = {"algorithm": "maml", "peft": "none", "shots": "5shot", "mode": "quick", "task": "digits",
                "model": "mlp", "seed": seed, "overrides": [*overrides, f"seed={seed}"]}
    values = lambda v: {"mean": float(np.mean(v)), "ci95": 0.01, "per_task": list(map(float, v))}
    metrics = {"status": status, "identity": identity,
               "evaluation": {"metric": "accuracy", "higher_is_better": True, "shots": {k: {
                   "meta_learned": {**values(ours), "curve_mean": [0.2, float(np.mean(ours))]},
                   "baselines": {"nearest_centroid": values(nearest)}, "task_sources": classes}}},
               "train": {"seconds_per_iteration": 0.01}, "parameters": {"adapted": 10}}
    (directory / "metrics.json").write_text(json.dumps(metrics))


def test_runs_that_differ_in_more_than_the_seed_are_never_pooled(tmp_path):
    for i, (iterations, seed) in enumerate([(1000, 0), (1000, 1), (20, 0), (20, 1)]):
        fake_job(tmp_path / "sweep" / str(i), [f"mode.num_iterations={iterations}"], seed, [0.8, 0.9], [0.7, 0.8])
    table = comparison(collect([tmp_path / "sweep"]))
    assert sorted(table.config) == ["mode.num_iterations=1000", "mode.num_iterations=20"]
    assert list(table.completed) == [2, 2] and list(table.seeds) == ["0 1", "0 1"]
    # leading with the best baseline, then the paired difference to it: +0.1 on every task
    assert table["5-shot best baseline"].str.startswith("nearest_centroid 0.750").all()
    assert table["5-shot vs nearest_centroid"].str.startswith("+0.100").all()


def test_a_duplicated_seed_is_flagged_and_counted_once(tmp_path):
    fake_job(tmp_path / "a", ["algorithm.inner_lr=0.1"], 0, [1.0, 1.0], [0.5, 0.5])
    fake_job(tmp_path / "b", ["algorithm.inner_lr=0.1"], 0, [0.0, 0.0], [0.5, 0.5])
    (row,) = comparison(collect([tmp_path])).to_dict("records")
    assert row["completed"] == 1 and "duplicated seed 0" in row["status"]
    assert row["5-shot"].startswith("1.000")  # the first run only


def test_a_report_folder_that_cannot_be_created_is_refused_in_one_line(tmp_path, capsys):
    from runners.aggregate import main as aggregate

    fake_job(tmp_path / "sweep" / "0", [], 0, [0.8, 0.9], [0.7, 0.8])
    (tmp_path / "file").write_text("a file, not a folder")
    assert aggregate([str(tmp_path / "sweep"), "--out", str(tmp_path / "file" / "report")]) == 2
    assert "cannot create that directory" in capsys.readouterr().err


def test_every_unreadable_metrics_file_is_listed_and_the_rest_reported(tmp_path):
    fake_job(tmp_path / "good", [], 0, [0.9, 0.9], [0.5, 0.5])
    for name in ("broken", "alien"):
        (tmp_path / name / ".hydra").mkdir(parents=True)
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    (tmp_path / "alien" / "metrics.json").write_text('{"accuracy": 1}')
    result = write_report([tmp_path], tmp_path / "report")
    assert result["completed"] == 1 and len(result["problems"]) == 2
    assert any("broken" in p for p in result["problems"]) and any("alien" in p for p in result["problems"])
    (tmp_path / "good" / "metrics.json").write_text("[]")
    with pytest.raises(ReportError, match="no readable run"):
        collect([tmp_path])


def test_jobs_a_sweep_asked_for_but_never_started_count_as_missing(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep / "0", ["algorithm.inner_lr=0.1"], 0, [0.9, 0.9], [0.5, 0.5])
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
        "overrides": {"task": ["algorithm.inner_lr=0.1,0.2", "seed=0"]}}}))
    frame = collect([sweep])
    missing = frame[frame.status == "missing"]
    assert len(frame) == 2 and len(missing) == 1 and "algorithm.inner_lr=0.2" in missing.job_dir.iloc[0]


def test_a_refused_run_is_listed_but_left_out_of_the_tables(tmp_path):
    fake_job(tmp_path / "good", [], 0, [0.9, 0.9], [0.5, 0.5])
    fake_job(tmp_path / "refused", ["shots.train=0"], 0, [0.0, 0.0], [0.5, 0.5], status="refused")
    result = write_report([tmp_path], tmp_path / "report")
    assert list(result["table"].config) == [""] and result["table"].status.tolist() == ["completed"]
    assert len(result["problems"]) == 1 and result["problems"][0].startswith("refused")


def test_runs_evaluated_at_different_k_are_tabled_and_plotted(tmp_path):
    fake_job(tmp_path / "sweep" / "a", ["shots=5shot"], 0, [0.8, 0.9], [0.7, 0.8], k="5")
    fake_job(tmp_path / "sweep" / "b", ["shots=10shot"], 0, [0.9, 0.9], [0.8, 0.9], k="10")
    write_report([tmp_path / "sweep"], tmp_path / "report")
    assert (tmp_path / "report" / "digits_adaptation.png").exists()


def test_pooled_seeds_get_the_interval_of_the_classes_their_tasks_share(tmp_path):
    rng = np.random.default_rng(0)
    effects = rng.normal(0, 0.1, 7)
    for seed in (0, 1):
        classes = np.stack([rng.choice(7, 5, replace=False) for _ in range(200)])
        ours = effects[classes].mean(axis=1) + rng.normal(0.8, 0.02, 200)
        fake_job(tmp_path / "sweep" / str(seed), [], seed, ours, ours - 0.05, classes=classes.tolist())
    table = comparison(collect([tmp_path / "sweep"]))
    assert table["_5-shot ci95"].iloc[0] > 5 * mean_ci95(np.concatenate([
        json.loads((tmp_path / "sweep" / str(s) / "metrics.json").read_text())["evaluation"]["shots"]["5"]
        ["meta_learned"]["per_task"] for s in (0, 1)]))[1]


def test_every_plot_renders_from_a_fixture_sweep_without_a_layout_warning(tmp_path):
    rng = np.random.default_rng(0)
    for i, algorithm in enumerate(["maml", "reptile", "protonet"]):
        job = tmp_path / "sweep" / algorithm
        fake_job(job, [f"algorithm={algorithm}"], 0, rng.uniform(0.5, 0.9, 20), rng.uniform(0.5, 0.9, 20))
        metrics = json.loads((job / "metrics.json").read_text())
        metrics["identity"]["algorithm"] = algorithm
        metrics["evaluation"]["num_inner_steps"] = [1, 5, 0][i]
        shot = metrics["evaluation"]["shots"]["5"]
        shot["meta_learned"]["curve_mean"] = list(np.linspace(0.2, 0.8, 11))
        shot["meta_learned"]["curve_ci95"] = [0.05] * 11
        shot["baselines"]["plain_init"] = {"mean": 0.3, "ci95": 0.02, "per_task": [0.3] * 20,
                                           "curve_mean": list(np.linspace(0.2, 0.4, 11))}
        (job / "metrics.json").write_text(json.dumps(metrics))
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"task": {"name": "digits", "n_way": 5}}))
        pd.DataFrame({"iteration": range(200), "loss": np.linspace(2, 0.1, 200),
                      "val_metric": [0.5 if j % 50 == 0 else np.nan for j in range(200)]}).to_csv(
            job / "history.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # constrained layout warns when it cannot fit labels or legends
        result = write_report([tmp_path / "sweep"], tmp_path / "report")
    names = ("kshot", "paired", "training_curves", "efficiency", "adaptation", "time_per_iteration")
    assert sorted(p.name for p in result["plots"]) == sorted(f"digits_{n}.png" for n in names)
    assert all((tmp_path / "report" / f"digits_{n}.pdf").stat().st_size > 0 for n in names)
    table = (tmp_path / "report" / "comparison.md").read_text()
    assert "inner steps" in table


@pytest.mark.parametrize("mean, ci, text", [(0.5, 0.021, "0.500 ± 0.021"), (0.78, 0.15, "0.78 ± 0.15"),
                                            (0.1234, 0.0034, "0.1234 ± 0.0034"), (2.5, 1.2, "2.5 ± 1.2")])
def test_table_figures_carry_the_decimals_their_interval_supports(mean, ci, text):
    assert with_ci(mean, ci) == text


def test_a_benchmark_is_written_under_its_task_and_mode_and_as_its_documented_name(tmp_path, capsys):
    from omegaconf import OmegaConf

    from metapeft.benchmarks import BenchmarkReport

    for seed, algorithm in enumerate(("maml", "reptile")):
        fake_job(tmp_path / "sweep" / algorithm, [f"algorithm={algorithm}"], seed, [0.8, 0.9], [0.7, 0.8])
        path = tmp_path / "sweep" / algorithm / "metrics.json"
        metrics = json.loads(path.read_text())
        metrics["identity"]["algorithm"] = algorithm
        metrics.update(memory={"peak_mlx_mb": 1.0, "max_rss_mb": 2.0}, inference_ms_per_sample=0.1,
                       parameters={"total": 10, "adapted": 10, "reduction_ratio": 1.0})
        path.write_text(json.dumps(metrics))
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}, "overrides": {"task": []}},
                               "task": {"name": "digits"}, "mode": {"name": "quick"}})
    BenchmarkReport("meta_learning_benchmark", "algorithm", str(tmp_path / "benchmarks")).on_multirun_end(config)
    named = json.loads((tmp_path / "benchmarks" / "meta_learning_benchmark_digits_quick.json").read_text())
    assert json.loads((tmp_path / "benchmarks" / "meta_learning_benchmark.json").read_text()) == named
    assert [row["algorithm"] for row in named["results"]] == ["maml", "reptile"]
    versus = named["results"][0]["5shot_versus_best_baseline"]  # paired on the same episodes: +0.1 on every task
    assert versus["difference"] == pytest.approx(0.1) and named["results"][0]["5shot_best_baseline"]["name"] == \
        "nearest_centroid"
    assert "+0.100" in capsys.readouterr().out


def test_an_interrupted_aggregation_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    import metapeft.report as report

    fake_job(tmp_path / "sweep" / "a", ["algorithm.inner_lr=0.1"], 0, [0.8, 0.9], [0.7, 0.8])
    write_report([tmp_path / "sweep"], tmp_path / "report")
    before = {p.name: p.read_bytes() for p in (tmp_path / "report").iterdir()}
    fake_job(tmp_path / "sweep" / "b", ["algorithm.inner_lr=0.2"], 0, [0.1, 0.2], [0.7, 0.8])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "plot_all", interrupted)  # Ctrl-C after the tables, before the plots
    with pytest.raises(KeyboardInterrupt):
        write_report([tmp_path / "sweep"], tmp_path / "report")
    assert {p.name: p.read_bytes() for p in (tmp_path / "report").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "sweep"]  # no staging folder left behind
    monkeypatch.undo()
    write_report([tmp_path / "sweep"], tmp_path / "report")  # uninterrupted: the new report replaces the old
    assert "algorithm.inner_lr=0.2" in (tmp_path / "report" / "comparison.md").read_text()


def test_three_seeds_make_one_row_whose_interval_includes_the_seed_to_seed_variance(tmp_path):
    rng = np.random.default_rng(5)
    effects = rng.normal(0, 0.05, 20)
    per_seed = []
    for seed, run_effect in zip((0, 1, 2), (-0.06, 0.0, 0.06)):  # training runs that differ more than tasks do
        classes = np.stack([rng.choice(20, 5, replace=False) for _ in range(100)])
        ours = 0.7 + run_effect + effects[classes].mean(axis=1) + rng.normal(0, 0.02, 100)
        per_seed.append((ours, classes))
        fake_job(tmp_path / "sweep" / str(seed), [], seed, ours, ours - 0.01, classes=classes.tolist())
    write_report([tmp_path / "sweep"], tmp_path / "report")
    table = comparison(collect([tmp_path / "sweep"]))
    assert len(table) == 1 and table.seeds.iloc[0] == "0 1 2" and table.interval.iloc[0] == "3 seeds x classes"
    tasks_only = mean_ci95(np.concatenate([v for v, _ in per_seed]), np.concatenate([c for _, c in per_seed]))[1]
    seed_means = [v.mean() for v, _ in per_seed]
    seeds_alone = 1.96 * np.std(seed_means, ddof=1) / np.sqrt(3)  # at least the normal quantile of the seed spread
    assert table["_5-shot ci95"].iloc[0] > max(2 * tasks_only, seeds_alone)
    assert table["_5-shot mean"].iloc[0] == pytest.approx(np.mean(seed_means))
    report = (tmp_path / "report" / "comparison.md").read_text()
    assert "variance between training runs" in report and "Holm" in report
    assert table["5-shot Holm p"].iloc[0] == pytest.approx(table["_5-shot p"].iloc[0])  # a family of one


def test_holm_adjusts_over_every_configuration_and_k_of_the_table(tmp_path):
    rng = np.random.default_rng(6)
    for lr in ("0.1", "0.2", "0.3"):
        ours = rng.normal(0.7, 0.05, 50)
        fake_job(tmp_path / "sweep" / lr, [f"algorithm.inner_lr={lr}"], 0, ours, ours - rng.normal(0.01, 0.05, 50))
    table = comparison(collect([tmp_path / "sweep"]))
    assert (table.interval == "1 seed: test tasks only").all()
    raw, adjusted = table["_5-shot p"].to_numpy(), table["5-shot Holm p"].to_numpy()
    assert (adjusted >= raw).all() and adjusted[np.argmin(raw)] == pytest.approx(min(1.0, 3 * raw.min()))


def test_ctrl_c_during_aggregation_says_so_in_one_line_and_exits_130(tmp_path, monkeypatch, capsys):
    from metapeft.cli import aggregate

    fake_job(tmp_path / "sweep" / "0", [], 0, [0.5, 0.6], [0.4, 0.5])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(aggregate, "write_report", interrupted)
    assert aggregate.main([str(tmp_path / "sweep")]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err and err.count("\n") == 1


def test_a_row_whose_baselines_ran_below_full_strength_says_so(tmp_path):
    for seed in (0, 1):
        fake_job(tmp_path / "sweep" / str(seed), [], seed, [0.5, 0.6, 0.7], [0.4, 0.5, 0.6])
    path = tmp_path / "sweep" / "1" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["baselines_below_full_strength"] = ["pretraining reached its cap of 200 iterations (mode=tiny)"]
    path.write_text(json.dumps(metrics))
    frame = collect([tmp_path / "sweep"])
    assert comparison(frame)["baselines below full strength"].iloc[0] == "1 of 2 runs (summary.csv)"
    assert "reached its cap" in " ".join(frame["baselines below full strength"])
