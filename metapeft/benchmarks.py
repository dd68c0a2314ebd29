"""The two named benchmarks: sweeps of the ordinary runner whose results are gathered into one JSON and a table.

``experiment=meta_learning_benchmark`` compares the algorithms; ``experiment=peft_comparison`` the PEFT methods.
Each is a multirun (conf/experiment/*.yaml); when it ends, ``BenchmarkReport`` reads every job of the sweep
through ``metapeft.report`` and writes ``outputs/benchmarks/<name>_<task>_<mode>.json`` and, as the latest run of
that benchmark, ``outputs/benchmarks/<name>.json``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from metapeft import io
from metapeft.report import baseline_names, collect, eval_shots, paired_difference, pooled

log = logging.getLogger("metapeft.benchmarks")


def convergence(job_dir: str, points: int = 10) -> list[dict]:
    """Meta-training loss (mean over windows) and validation metric at evenly spaced iterations."""
    path = Path(job_dir) / "history.csv"
    if not path.exists():
        return []
    history = pd.read_csv(path)
    window = max(1, len(history) // points)
    rows = []
    for start in range(0, len(history), window):
        chunk = history.iloc[start: start + window]
        val = chunk.val_metric.dropna()
        rows.append({"iteration": int(chunk.iteration.iloc[-1]), "loss": float(chunk.loss.mean()),
                     "val_metric": float(val.iloc[-1]) if len(val) else None})
    return rows


def benchmark_rows(sweep_dir: Path, compare: str) -> list[dict]:
    frame = collect([sweep_dir])
    rows = []
    for name, runs in frame.groupby(compare, sort=True):
        done = runs[runs.status == "completed"]
        row: dict[str, Any] = {compare: name, "task": runs.task.iloc[0], "runs": len(runs),
                               "completed": len(done), "failed": runs[runs.status != "completed"].job_dir.tolist()}
        if not done.empty:
            row["metric"] = done.metric.iloc[0]
            higher = bool(done.higher_is_better.iloc[0])
            for k in eval_shots(done):
                baselines = {name: dict(zip(("mean", "ci95"), pooled(done, k, f"baseline.{name}")))
                             for name in baseline_names(done, k)}
                row[f"{k}shot_meta_learned"] = dict(zip(("mean", "ci95"), pooled(done, k, "meta_learned")))
                if baselines:
                    best = (max if higher else min)(baselines, key=lambda name: baselines[name]["mean"])
                    row[f"{k}shot_best_baseline"] = {"name": best, **baselines[best]}
                    paired = paired_difference(done, k, best, higher)
                    if paired:  # positive: the meta-learned start is better, on the same episodes
                        row[f"{k}shot_versus_best_baseline"] = dict(zip(("difference", "ci95"), paired))
                row[f"{k}shot_baselines"] = baselines
                # adaptation speed: the test metric after 0, 1, ... inner steps (first seed)
                row[f"{k}shot_adaptation_curve"] = done.iloc[0][f"_{k}shot.meta_learned.curve"]
            first = done.iloc[0]
            row.update({
                "seconds_per_iteration": float(done["train.seconds_per_iteration"].mean()),
                "peak_memory_mb": float(done["memory.peak_mlx_mb"].max()),
                "max_rss_mb": float(done["memory.max_rss_mb"].max()),
                "total_parameters": int(first["parameters.total"]),
                "adapted_parameters": int(first["parameters.adapted"]),
                "reduction_ratio": float(first["parameters.reduction_ratio"]),
                "inference_ms_per_sample": float(done["inference_ms_per_sample"].mean()),
                "convergence": convergence(first.job_dir),
            })
        rows.append(row)
    return rows


def table(rows: list[dict], compare: str) -> str:
    lines = []
    for row in rows:
        line = {compare: row[compare], "completed": f"{row['completed']}/{row['runs']}"}
        for key, value in row.items():
            if key.endswith("shot_best_baseline"):  # leading: what the meta-learned figure has to beat
                line[key.replace("shot_best_baseline", "-shot best baseline")] = \
                    f"{value['name']} {value['mean']:.3f} ± {value['ci95']:.3f}"
            if key.endswith("shot_meta_learned"):
                line[key.replace("shot_meta_learned", "-shot")] = f"{value['mean']:.3f} ± {value['ci95']:.3f}"
            if key.endswith("shot_versus_best_baseline"):
                line[key.replace("shot_versus_best_baseline", "-shot vs best")] = \
                    f"{value['difference']:+.3f} ± {value['ci95']:.3f}"
        for key in ("seconds_per_iteration", "adapted_parameters", "total_parameters", "inference_ms_per_sample",
                    "peak_memory_mb"):
            if key in row:
                line[key] = row[key]
        lines.append(line)
    return pd.DataFrame(lines).to_markdown(index=False, floatfmt=".4g")


class BenchmarkReport(Callback):
    """On multirun end: gather the sweep into ``<out_dir>/<name>_<task>_<mode>.json`` and print the comparison
    table (one file per task and mode: a glyphs benchmark does not overwrite the digits one). ``<out_dir>/<name>.json``
    holds the latest of them, the path the benchmark has always been documented at."""

    def __init__(self, name: str, compare: str, out_dir: str = "outputs/benchmarks"):
        self.name, self.compare, self.out_dir = name, compare, Path(out_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = benchmark_rows(sweep_dir, self.compare)
        result = {"benchmark": self.name, "mode": config.mode.name, "sweep_dir": str(sweep_dir),
                  "command_overrides": list(config.hydra.overrides.task), "compare": self.compare, "results": rows}
        path = self.out_dir / f"{self.name}_{config.task.name}_{config.mode.name}.json"
        io.write_json(path, result)
        io.write_json(self.out_dir / f"{self.name}.json", result)
        print(f"\n{self.name} ({config.mode.name} mode), mean ± 95% CI over evaluation tasks:\n")
        print(table(rows, self.compare))
        print(f"\nwritten to {path}")
