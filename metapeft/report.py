"""Merge the runs of one or more sweeps into a summary table, a comparison table and plots.

Everything is read from each job's files (``metrics.json``, ``.hydra/overrides.yaml``, ``.hydra/hydra.yaml``),
never from folder names.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure

from metapeft import io
from metapeft.config import GROUPS
from metapeft.stats import mean_ci95


class ReportError(ValueError):
    pass


def find_jobs(sweep_dirs: Iterable[Path]) -> list[Path]:
    jobs = []
    for sweep_dir in map(Path, sweep_dirs):
        if not sweep_dir.is_dir():
            raise ReportError(f"{sweep_dir}: not a directory")
        found = sorted({p.parent for p in sweep_dir.glob("**/metrics.json")} |
                       {p.parent for p in sweep_dir.glob("**/.hydra") if p.is_dir()})
        if not found:
            raise ReportError(f"{sweep_dir}: no runs found (no job directory with metrics.json or .hydra/ below it)")
        jobs.extend(found)
    return jobs


def read_metrics(path: Path) -> dict:
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ReportError(f"{path}: not a readable metrics.json ({error})") from error
    if not isinstance(metrics, dict) or "status" not in metrics or "identity" not in metrics:
        raise ReportError(f"{path}: not a metapeft metrics file (expected the keys 'status' and 'identity')")
    return metrics


def job_record(job_dir: Path) -> dict:
    """One row: identity from Hydra's records, status, and every metric of the run."""
    metrics_path = job_dir / "metrics.json"
    metrics = read_metrics(metrics_path) if metrics_path.exists() else {"status": "missing", "identity": {}}
    hydra_dir = job_dir / ".hydra"
    overrides = yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) if (hydra_dir / "overrides.yaml").exists() \
        else metrics["identity"].get("overrides", [])
    choices = {}
    if (hydra_dir / "hydra.yaml").exists():
        choices = yaml.safe_load((hydra_dir / "hydra.yaml").read_text())["hydra"]["runtime"]["choices"]
    row = {"job_dir": str(job_dir), "status": metrics["status"], "reason": metrics.get("reason", "")}
    for group in GROUPS:
        row[group] = choices.get(group, metrics["identity"].get(group))
    row["seed"] = metrics["identity"].get("seed")
    for override in overrides or []:
        key, _, value = override.lstrip("+~").partition("=")
        if key not in GROUPS:
            row[f"override.{key}"] = value
    evaluation = metrics.get("evaluation")
    if evaluation:
        row["metric"] = evaluation["metric"]
        for k, result in evaluation["shots"].items():
            for side in ("meta_learned", "scratch"):
                row[f"{k}shot.{side}.mean"] = result[side]["mean"]
                row[f"{k}shot.{side}.ci95"] = result[side]["ci95"]
                row[f"_{k}shot.{side}.per_task"] = result[side].get("per_task")
                row[f"_{k}shot.{side}.curve"] = result[side]["curve_mean"]
    for section in ("train", "parameters", "memory"):
        for key, value in (metrics.get(section) or {}).items():
            row[f"{section}.{key}"] = value
    row["inference_ms_per_sample"] = metrics.get("inference_ms_per_sample")
    return row


def collect(sweep_dirs: Iterable[Path]) -> pd.DataFrame:
    return pd.DataFrame([job_record(job) for job in find_jobs(sweep_dirs)])


def eval_shots(frame: pd.DataFrame) -> list[str]:
    shots = {c.split("shot.")[0] for c in frame.columns if c.endswith("shot.meta_learned.mean")}
    return sorted(shots, key=int)


def pooled(runs: pd.DataFrame, k: str, side: str) -> tuple[float, float]:
    """Mean and 95% CI over every evaluation task of every run (seeds pooled).

    Runs written before per-task values were stored fall back to their own mean and CI (one run) or to the
    spread of the run means (several runs).
    """
    per_task = [v for v in runs[f"_{k}shot.{side}.per_task"] if isinstance(v, list)]
    if len(per_task) == len(runs):
        return mean_ci95(np.concatenate([np.asarray(v, dtype=float) for v in per_task]))
    means = runs[f"{k}shot.{side}.mean"].to_numpy(dtype=float)
    return (float(means[0]), float(runs[f"{k}shot.{side}.ci95"].iloc[0])) if len(means) == 1 else mean_ci95(means)


def comparison(frame: pd.DataFrame) -> pd.DataFrame:
    """A row per task x algorithm x peft: K-shot metric (mean ± CI, seeds pooled), scratch, s/iteration, params."""
    rows = []
    keys = ["task", "algorithm", "peft"]
    for (task, algorithm, peft), runs in frame.groupby(keys, sort=True, dropna=False):
        done = runs[runs.status == "completed"]
        row = {"task": task, "algorithm": algorithm, "peft": peft, "runs": len(runs), "completed": len(done)}
        bad = runs[runs.status != "completed"]
        counts = bad.status.value_counts().items()
        row["status"] = "completed" if bad.empty else ", ".join(f"{s}: {n}" for s, n in counts)
        if not done.empty:
            row["metric"] = done.metric.iloc[0]
            for k in eval_shots(done):
                for side, label in (("meta_learned", f"{k}-shot"), ("scratch", f"{k}-shot scratch")):
                    mean, ci = pooled(done, k, side)
                    row[label] = f"{mean:.4g} ± {ci:.2g}"
                    row[f"_{label} mean"], row[f"_{label} ci95"] = mean, ci
            row["s/iteration"] = done["train.seconds_per_iteration"].mean()
            row["adapted params"] = int(done["parameters.adapted"].iloc[0])
        rows.append(row)
    return pd.DataFrame(rows)


def public(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[[c for c in frame.columns if not c.startswith("_")]]


def write_report(sweep_dirs: list[Path], out_dir: Path) -> dict:
    frame = collect(sweep_dirs)
    out_dir.mkdir(parents=True, exist_ok=True)
    io.write_csv(out_dir / "summary.csv", public(frame))
    table = comparison(frame)
    io.write_csv(out_dir / "comparison.csv", public(table))
    io.write_text(out_dir / "comparison.md", public(table).to_markdown(index=False, floatfmt=".4g") + "\n")
    plots = plot_all(frame, table, out_dir)
    return {"runs": len(frame), "completed": int((frame.status == "completed").sum()), "table": table, "plots": plots}


def _labels(table: pd.DataFrame) -> list[str]:
    return [f"{a}+{p}" for a, p in zip(table.algorithm, table.peft)]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    io.save_figure(fig, path)
    return path


def plot_all(frame: pd.DataFrame, table: pd.DataFrame, out_dir: Path) -> list[Path]:
    plots = []
    done = frame[frame.status == "completed"]
    for task, task_table in table[table.completed > 0].groupby("task"):
        runs = done[done.task == task]
        metric = task_table.metric.iloc[0]
        direction = "higher is better" if metric == "accuracy" else "lower is better"
        shots = eval_shots(runs)
        labels = _labels(task_table)
        x = np.arange(len(labels))

        fig = Figure(figsize=(max(6, 0.9 * len(labels) + 2), 4))
        ax = fig.subplots()
        width = 0.8 / (len(shots) + 1)
        for i, k in enumerate(shots):
            ax.bar(x + i * width, task_table[f"_{k}-shot mean"], width, yerr=task_table[f"_{k}-shot ci95"],
                   capsize=3, label=f"{k}-shot")
        scratch_k = shots[-1]
        ax.bar(x + len(shots) * width, task_table[f"_{scratch_k}-shot scratch mean"], width,
               yerr=task_table[f"_{scratch_k}-shot scratch ci95"], capsize=3, color="lightgray",
               label=f"{scratch_k}-shot scratch baseline")
        ax.set_xticks(x + width * len(shots) / 2, labels, rotation=30, ha="right")
        ax.set_ylabel(f"test {metric} after adaptation ({direction})")
        ax.set_title(f"{task}: K-shot {metric}, mean ± 95% CI over evaluation tasks")
        ax.legend(fontsize=8)
        plots.append(_save(fig, out_dir / f"{task}_kshot.png"))

        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        for _, run in runs.iterrows():
            history = Path(run.job_dir) / "history.csv"
            if history.exists():
                loss = pd.read_csv(history)["loss"]
                window = max(1, len(loss) // 50)
                ax.plot(loss.rolling(window, min_periods=1).mean(),
                        label=f"{run.algorithm}+{run.peft} (seed {run.seed})")
        ax.set_xlabel("meta-iteration")
        ax.set_ylabel("meta-training query loss (moving average)")
        ax.set_yscale("log")
        ax.set_title(f"{task}: meta-training curves")
        ax.legend(fontsize=7)
        plots.append(_save(fig, out_dir / f"{task}_training_curves.png"))

        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        k = shots[len(shots) // 2]
        ax.errorbar(task_table["adapted params"], task_table[f"_{k}-shot mean"], yerr=task_table[f"_{k}-shot ci95"],
                    fmt="o", capsize=3)
        for label, px, py in zip(labels, task_table["adapted params"], task_table[f"_{k}-shot mean"]):
            ax.annotate(label, (px, py), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("adapted parameters per task (log scale)")
        ax.set_ylabel(f"{k}-shot test {metric} ({direction})")
        ax.set_title(f"{task}: parameter efficiency")
        plots.append(_save(fig, out_dir / f"{task}_efficiency.png"))

        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        for _, run in runs.iterrows():
            curve = run[f"_{k}shot.meta_learned.curve"]
            ax.plot(range(len(curve)), curve, marker=".", label=f"{run.algorithm}+{run.peft} (seed {run.seed})")
        ax.set_xlabel("inner-loop steps on the support set")
        ax.set_ylabel(f"{k}-shot test {metric} ({direction})")
        ax.set_title(f"{task}: adaptation curves")
        ax.legend(fontsize=7)
        plots.append(_save(fig, out_dir / f"{task}_adaptation.png"))

        fig = Figure(figsize=(max(6, 0.6 * len(labels) + 2), 4))
        ax = fig.subplots()
        ax.bar(labels, 1e3 * task_table["s/iteration"])
        ax.set_ylabel("milliseconds per meta-iteration")
        ax.set_title(f"{task}: meta-training time per iteration")
        ax.tick_params(axis="x", rotation=30)
        plots.append(_save(fig, out_dir / f"{task}_time_per_iteration.png"))
    return plots
