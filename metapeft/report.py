"""Merge the runs of one or more sweeps into a summary table, a comparison table and plots.

Everything is read from each job's files (``metrics.json``, ``.hydra/overrides.yaml``, ``.hydra/hydra.yaml``),
never from folder names.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import yaml

from metapeft import io
from metapeft.config import GROUPS
from metapeft.plots import plot_all
from metapeft.stats import ONE_SEED, SEEDS, SEEDS_AND_CLASSES, Interval, holm, mean_ci95, p_value, seeds_ci95
from metapeft.sweep import expected_jobs, identifying


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


def job_overrides(job_dir: Path, metrics: dict) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else metrics["identity"].get("overrides", [])


def job_record(job_dir: Path) -> dict:
    """One row: identity from Hydra's records, status, and every metric of the run. An unreadable metrics file
    gives a row with status ``unreadable`` and the reason."""
    metrics_path = job_dir / "metrics.json"
    try:
        metrics = read_metrics(metrics_path) if metrics_path.exists() else {"status": "missing", "identity": {}}
    except ReportError as error:
        metrics = {"status": "unreadable", "reason": str(error), "identity": {}}
    hydra_dir = job_dir / ".hydra"
    choices = {}
    if (hydra_dir / "hydra.yaml").exists():
        choices = yaml.safe_load((hydra_dir / "hydra.yaml").read_text())["hydra"]["runtime"]["choices"]
    row = {"job_dir": str(job_dir), "status": metrics["status"], "reason": metrics.get("reason", "")}
    for group in GROUPS:
        row[group] = choices.get(group, metrics["identity"].get(group))
    row["seed"] = metrics["identity"].get("seed")
    overrides = job_overrides(job_dir, metrics) or []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key not in GROUPS:
            row[f"override.{key}"] = value
    row["config"] = config_label(overrides)
    evaluation = metrics.get("evaluation")
    n_way = None
    if (hydra_dir / "config.yaml").exists():
        n_way = (yaml.safe_load((hydra_dir / "config.yaml").read_text()).get("task") or {}).get("n_way")
    if evaluation:
        row["metric"] = evaluation["metric"]
        row["higher_is_better"] = evaluation["higher_is_better"]
        row["inner_steps"] = evaluation.get("num_inner_steps")
        row["_chance"] = 1.0 / n_way if evaluation["metric"] == "accuracy" and isinstance(n_way, int) else None
        for k, result in evaluation["shots"].items():
            row[f"_{k}shot.task_sources"] = result.get("task_sources")
            sides = {"meta_learned": result["meta_learned"]}
            sides.update({f"baseline.{name}": b for name, b in result.get("baselines", {}).items()})
            for side, values in sides.items():
                row[f"{k}shot.{side}.mean"] = values["mean"]
                row[f"{k}shot.{side}.ci95"] = values["ci95"]
                row[f"_{k}shot.{side}.per_task"] = values.get("per_task")
                if "curve_mean" in values:
                    row[f"_{k}shot.{side}.curve"] = values["curve_mean"]
                    row[f"_{k}shot.{side}.curve_ci95"] = values.get("curve_ci95")
    for section in ("train", "parameters", "memory"):
        for key, value in (metrics.get(section) or {}).items():
            row[f"{section}.{key}"] = value
    row["inference_ms_per_sample"] = metrics.get("inference_ms_per_sample")
    row["baselines below full strength"] = " | ".join(metrics.get("baselines_below_full_strength") or [])
    return row


def config_label(overrides: list[str]) -> str:
    """What identifies a run's configuration besides its group choices: its identifying overrides
    (``sweep.identifying``) but the seed. Runs with equal groups and labels differ only in seed."""
    return " ".join(o for o in identifying(overrides)
                    if (key := o.lstrip("+~").partition("=")[0]) not in (*GROUPS, "seed", "experiment")
                    and not key.startswith("hydra"))


def collect(sweep_dirs: Iterable[Path]) -> pd.DataFrame:
    """A row per job found, plus a ``missing`` row per job a sweep asked for that never started."""
    rows = [job_record(job) for job in find_jobs(sweep_dirs)]
    for sweep_dir in map(Path, sweep_dirs):
        expected = expected_jobs(sweep_dir)
        if expected is None:
            continue
        started = {tuple(sorted(job_overrides(Path(r["job_dir"]), {"identity": {}}) or []))
                   for r in rows if Path(r["job_dir"]).is_relative_to(sweep_dir)}
        for job in expected:
            if tuple(sorted(job)) not in started:
                rows.append({"job_dir": f"{sweep_dir} ({' '.join(job)})", "status": "missing",
                             "reason": "never started (listed by multirun.yaml, no job directory)",
                             "config": config_label(job),
                             **{g: next((o.split("=", 1)[1] for o in job if o.startswith(f"{g}=")), None)
                                for g in GROUPS}})
    frame = pd.DataFrame(rows)
    unreadable = frame[frame.status == "unreadable"]
    if len(unreadable) == len(frame):
        raise ReportError("no readable run: " + "; ".join(unreadable.reason))
    return frame


def eval_shots(frame: pd.DataFrame) -> list[str]:
    shots = {c.split("shot.")[0] for c in frame.columns if c.endswith("shot.meta_learned.mean")}
    return sorted(shots, key=int)


def baseline_names(frame: pd.DataFrame, k: str) -> list[str]:
    prefix, suffix = f"{k}shot.baseline.", ".mean"
    return sorted({c[len(prefix): -len(suffix)] for c in frame.columns if c.startswith(prefix) and c.endswith(suffix)
                   and frame[c].notna().all()})


def with_ci(mean: float, ci: float, signed: bool = False) -> str:
    """``mean ± ci`` with as many decimals as the CI's first two significant digits need (0.78 ± 0.15,
    0.500 ± 0.021), the same for both numbers."""
    decimals = 3 if not (ci > 0 and math.isfinite(ci)) else min(6, max(1, 1 - math.floor(math.log10(ci))))
    return f"{mean:{'+' if signed else ''}.{decimals}f} ± {ci:.{decimals}f}"


def per_seed(runs: pd.DataFrame, column: str) -> list[np.ndarray] | None:
    """The per-task values of each run (seed) in ``column``; None where a run stored none."""
    if column not in runs or not all(isinstance(v, list) for v in runs[column]):
        return None
    return [np.asarray(v, dtype=float) for v in runs[column]]


def sources_per_seed(runs: pd.DataFrame, k: str) -> list[np.ndarray] | None:
    """The class sources of each run's tasks; None where a run has none (regression tasks, which are independent
    draws, or runs written before sources were stored)."""
    return per_seed(runs, f"_{k}shot.task_sources")


def pooled(runs: pd.DataFrame, k: str, side: str) -> Interval:
    """Mean and 95% CI over the runs of one configuration (runs that differ only in seed), counting the variance
    between training runs as well as between test classes (``metapeft.stats.seeds_ci95``).

    Runs written before per-task values were stored fall back to their own mean and CI (one run) or to the
    spread of the run means (several runs).
    """
    values = per_seed(runs, f"_{k}shot.{side}.per_task")
    if values is not None:
        return seeds_ci95(values, sources_per_seed(runs, k))
    means = runs[f"{k}shot.{side}.mean"].to_numpy(dtype=float)
    if len(means) == 1:
        return Interval(float(means[0]), float(runs[f"{k}shot.{side}.ci95"].iloc[0]), math.inf, ONE_SEED)
    return Interval(*mean_ci95(means), len(means) - 1, SEEDS, len(means))  # the t interval of the seed means


def paired_difference(runs: pd.DataFrame, k: str, baseline: str, higher: bool) -> Interval | None:
    """The meta-learned figure minus ``baseline``'s (sign flipped where lower is better: positive is better), task
    by task on the same episodes, with the interval of ``pooled``; None for runs that stored no per-task values."""
    differences = differences_per_seed(runs, k, baseline, higher)
    return None if differences is None else seeds_ci95(differences, sources_per_seed(runs, k))


def differences_per_seed(runs: pd.DataFrame, k: str, baseline: str, higher: bool) -> list[np.ndarray] | None:
    """Each run's per-task paired differences to ``baseline`` (positive: better); None where none were stored."""
    ours, theirs = (per_seed(runs, f"_{k}shot.{side}.per_task") for side in ("meta_learned", f"baseline.{baseline}"))
    if ours is None or theirs is None:
        return None
    return [(o - t) if higher else (t - o) for o, t in zip(ours, theirs)]


def interval_label(interval: Interval) -> str:
    """What a table row's interval covers, in a few words."""
    if interval.num_seeds == 1:
        return "1 seed: test tasks only"
    return f"{interval.num_seeds} seeds" + (" x classes" if interval.method == SEEDS_AND_CLASSES else "")


GROUP_KEYS = ["task", "algorithm", "peft", "model", "shots", "mode", "config"]


def comparison(frame: pd.DataFrame) -> pd.DataFrame:
    """A row per configuration (group choices and every override but the seed: runs that differ in anything else
    are never pooled). For each K, leading: the best baseline measured on the same episodes (pooled over the
    row's seeds), then the meta-learned figure, then the paired difference to that baseline (positive: better).
    A seed that appears twice in a row is flagged, and only its first run counts."""
    rows = []
    frame = frame[frame.status != "refused"]  # an invalid configuration never ran: listed as a problem instead
    for identity, runs in frame.groupby(GROUP_KEYS, sort=True, dropna=False):
        row = dict(zip(GROUP_KEYS, identity))
        bad = runs[runs.status != "completed"]
        done = runs[runs.status == "completed"]
        duplicated = sorted(done.seed[done.seed.duplicated()].unique().tolist())
        done = done.drop_duplicates(subset="seed")
        row.update(runs=len(runs), completed=len(done), seeds=" ".join(str(s) for s in sorted(done.seed)))
        notes = [f"{s}: {n}" for s, n in bad.status.value_counts().items()]
        notes += [f"duplicated seed {s} (first run kept)" for s in duplicated]
        row["status"] = "; ".join(notes) or "completed"
        if not done.empty:
            row["metric"] = done.metric.iloc[0]
            row["inner steps"] = done["inner_steps"].iloc[0] if "inner_steps" in done else None
            row["_chance"] = done["_chance"].iloc[0] if "_chance" in done else None
            higher = bool(done.higher_is_better.iloc[0])
            for k in eval_shots(done):
                names = baseline_names(done, k)
                if names:
                    means = {name: pooled(done, k, f"baseline.{name}") for name in names}
                    best = (max if higher else min)(names, key=lambda name: means[name].mean)
                    row[f"{k}-shot best baseline"] = f"{best} {with_ci(*means[best][:2])}"
                    row[f"_{k}-shot baseline mean"], row[f"_{k}-shot baseline ci95"] = means[best][:2]
                    row[f"_{k}-shot baseline"] = best
                ours = pooled(done, k, "meta_learned")
                row[f"{k}-shot"] = with_ci(*ours[:2])
                row[f"_{k}-shot mean"], row[f"_{k}-shot ci95"] = ours[:2]
                row["interval"] = interval_label(ours)
                paired = paired_difference(done, k, best, higher) if names else None
                if paired:
                    row[f"{k}-shot vs {best}"] = with_ci(*paired[:2], signed=True)
                    row[f"_{k}-shot p"] = p_value(paired)
                    row[f"_{k}-shot difference"], row[f"_{k}-shot difference ci95"] = paired[:2]
                    row[f"_{k}-shot difference by seed"] = [
                        float(d.mean()) for d in differences_per_seed(done, k, best, higher)]
            weak = done["baselines below full strength"].fillna("") if "baselines below full strength" in done else []
            if any(weak):  # the strongest baseline may be weaker than it could be: the row says so
                row["baselines below full strength"] = f"{sum(map(bool, weak))} of {len(done)} runs (summary.csv)"
            row["s/iteration"] = done["train.seconds_per_iteration"].mean()
            row["adapted params"] = int(done["parameters.adapted"].iloc[0])
        rows.append(row)
    return with_holm(pd.DataFrame(rows))


def with_holm(table: pd.DataFrame) -> pd.DataFrame:
    """Each K's paired difference with its p-value adjusted by Holm over every comparison in the table (every row
    and K): the family a reader scans for wins. A comparison is a win only where its adjusted p is under 0.05."""
    p_columns = [c for c in table.columns if c.startswith("_") and c.endswith("-shot p")]
    cells = [(i, c) for c in p_columns for i in table.index if pd.notna(table.at[i, c])]
    if cells:
        for (i, c), adjusted in zip(cells, holm([table.at[i, c] for i, c in cells])):
            table.loc[i, c[1:-2] + " Holm p"] = float(adjusted)
    return table


def caption(table: pd.DataFrame) -> str:
    """What comparison.md's intervals and p-values are, above the table."""
    comparisons = sum(int(table[c].notna().sum()) for c in table.columns if c.endswith(" Holm p"))
    return ("Mean ± 95% CI per configuration. Over several seeds the interval adds the variance between training runs "
            "(the seed means' t interval) to the variance between test classes (delete-one-class jackknife over "
            "every task of every seed; Satterthwaite degrees of freedom); a row from one seed covers its test tasks "
            "only ('interval' says which). 'vs' columns: the paired difference to the best baseline on the same "
            f"episodes (positive: better); 'Holm p' adjusts its p-value over the {comparisons} comparisons in this "
            "table (Holm 1979).\n\n")


def baselines_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Every baseline of every configuration, for each K (mean ± 95% CI, pooled over the configuration's seeds)."""
    rows = []
    done = frame[frame.status == "completed"].drop_duplicates(subset=[*GROUP_KEYS, "seed"])
    for identity, runs in done.groupby(GROUP_KEYS, sort=True, dropna=False):
        for k in eval_shots(runs):
            for name in baseline_names(runs, k):
                interval = pooled(runs, k, f"baseline.{name}")
                rows.append({**dict(zip(GROUP_KEYS, identity)), "K": int(k), "baseline": name,
                             "value": with_ci(*interval[:2]), "interval": interval_label(interval)})
    return pd.DataFrame(rows)


def public(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[[c for c in frame.columns if not c.startswith("_")]]


REPORT_FILES = ("summary.csv", "comparison.csv", "baselines.csv", "comparison.md")


def write_report(sweep_dirs: list[Path], out_dir: Path) -> dict:
    """The report of ``sweep_dirs`` in ``out_dir``, written into a temporary folder beside it and moved into place
    whole: an interrupted aggregation leaves the previous report as it was, and two at once leave one of theirs, not
    a mix. An ``out_dir`` holding other files than a report's is written into file by file instead."""
    frame = collect(sweep_dirs)  # reads the runs' files only: an empty or unreadable sweep leaves no report folder
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # as a folder made by mkdir would be (mkdtemp's is private)
    except OSError as error:
        raise ReportError(f"--out {out_dir}: cannot create that directory ({error.strerror})") from None
    try:
        result = write_report_files(frame, staging)
        replace_report(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def write_report_files(frame, out_dir: Path) -> dict:
    io.write_csv(out_dir / "summary.csv", public(frame))
    table = comparison(frame)
    baselines = baselines_table(frame)
    io.write_csv(out_dir / "comparison.csv", public(table))
    io.write_csv(out_dir / "baselines.csv", baselines)
    io.write_text(out_dir / "comparison.md", caption(table) + public(table).to_markdown(index=False) + "\n\n" +
                  (baselines.to_markdown(index=False) if not baselines.empty else "") + "\n")
    plots = plot_all(frame, table, out_dir, eval_shots)
    problems = frame[frame.status.isin(["unreadable", "missing", "refused"])]
    return {"runs": len(frame), "completed": int((frame.status == "completed").sum()), "table": table,
            "plots": plots, "problems": [f"{r.status}: {r.job_dir}: {r.reason}" for r in problems.itertuples()]}


def replace_report(staging: Path, out_dir: Path) -> None:
    """Move the finished report in ``staging`` to ``out_dir``: a rename of the whole folder where ``out_dir`` is
    absent or holds only an earlier report, else file by file (each write atomic)."""
    earlier = list(out_dir.iterdir()) if out_dir.is_dir() else []
    if all(f.name in REPORT_FILES or f.suffix == ".png" for f in earlier):
        retired = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():
            out_dir.rename(retired)
        staging.rename(out_dir)
        shutil.rmtree(retired, ignore_errors=True)
        return
    for path in staging.iterdir():
        os.replace(path, out_dir / path.name)
