"""The comparison plots of ``runners/aggregate.py``, drawn to be printed: constrained layout with legends outside
the data, the best baseline beside every meta-learned figure at every K, chance level on accuracy axes, 95% CIs
wherever a mean is shown, the inner-step budget marked on adaptation curves, each algorithm's training loss on its
own axes above its validation metric, a colour-blind-safe palette (Okabe and Ito), and PNG plus PDF."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter

from metapeft import io

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
BASELINE_GREY = "#999999"


def colour(i: int) -> str:
    return OKABE_ITO[i % len(OKABE_ITO)]


def labels(table: pd.DataFrame) -> list[str]:
    return [f"{r.algorithm}+{r.peft} ({r.model}){' ' + r.config if r.config else ''}" for r in table.itertuples()]


def run_label(run) -> str:
    return f"{run.algorithm}+{run.peft} ({run.model}) seed {run.seed}"


def save(fig: Figure, path: Path) -> Path:
    """PNG for screens, PDF for papers."""
    io.save_figure(fig, path.with_suffix(".png"), dpi=150)
    io.save_figure(fig, path.with_suffix(".pdf"))
    return path.with_suffix(".png")


def metric_label(metric: str, higher_is_better: bool) -> str:
    unit = "accuracy (fraction correct)" if metric == "accuracy" else "mean squared error"
    return f"test {unit}, {'higher' if higher_is_better else 'lower'} is better"


def chance_line(ax, chance: float | None) -> None:
    if chance:
        ax.axhline(chance, color="black", linestyle=":", linewidth=1, label=f"chance ({chance:.2f})")


def legend_outside(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def kshot(task: str, table: pd.DataFrame, shots: list[str], out_dir: Path) -> Path:
    """One panel per K: each configuration's meta-learned figure next to its best baseline, with 95% CIs."""
    names, higher = labels(table), bool(table.metric.iloc[0] == "accuracy")
    x = np.arange(len(names))
    fig = Figure(figsize=(max(4.0, 1.1 * len(names) + 1.5) * len(shots) / 1.5 + 2, 4.2), layout="constrained")
    axes = fig.subplots(1, len(shots), sharey=True, squeeze=False)[0]
    for ax, k in zip(axes, shots):
        if f"_{k}-shot baseline mean" in table:
            ax.bar(x - 0.2, table[f"_{k}-shot baseline mean"], 0.4, yerr=table[f"_{k}-shot baseline ci95"],
                   capsize=3, color=BASELINE_GREY, hatch="//", edgecolor="black", linewidth=0.5,
                   label="best baseline, same episodes")
        ax.bar(x + 0.2, table[f"_{k}-shot mean"], 0.4, yerr=table[f"_{k}-shot ci95"], capsize=3, color=colour(0),
               edgecolor="black", linewidth=0.5, label="meta-learned")
        chance_line(ax, table["_chance"].iloc[0] if "_chance" in table else None)
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{k}-shot")
    axes[0].set_ylabel(metric_label(table.metric.iloc[0], higher))
    legend_outside(axes[-1])
    fig.suptitle(f"{task}: mean ± 95% CI over evaluation tasks")
    return save(fig, out_dir / f"{task}_kshot.png")


def adaptation(task: str, runs: pd.DataFrame, k: str, out_dir: Path) -> Path:
    """Query metric after each inner step, with 95% CI bands; each run's plain initialization dashed; a star where
    each run's reported figure is read (its inner-step budget)."""
    accuracy = runs.metric.iloc[0] == "accuracy"
    fig = Figure(figsize=(8.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for i, (_, run) in enumerate(runs.iterrows()):
        curve = run.get(f"_{k}shot.meta_learned.curve")
        if not isinstance(curve, list):  # a run evaluated at other K (e.g. shots.eval=[${shots.train}])
            continue
        steps = np.arange(len(curve))
        ax.plot(steps, curve, marker=".", color=colour(i), label=run_label(run))
        band = run.get(f"_{k}shot.meta_learned.curve_ci95")
        if isinstance(band, list):
            low, high = np.subtract(curve, band), np.add(curve, band)
            if accuracy:  # a symmetric interval can pass 0 or 1; accuracy cannot
                low, high = np.clip(low, 0, 1), np.clip(high, 0, 1)
            ax.fill_between(steps, low, high, color=colour(i), alpha=0.15, linewidth=0)
        plain = run.get(f"_{k}shot.baseline.plain_init.curve")
        if isinstance(plain, list):
            ax.plot(np.arange(len(plain)), plain, linestyle="--", color=colour(i), alpha=0.8,
                    label=f"{run_label(run)}: plain init")
        budget = run.get("inner_steps")
        if budget is not None and budget == budget and int(budget) < len(curve):
            ax.plot([int(budget)], [curve[int(budget)]], marker="*", markersize=13, color=colour(i),
                    markeredgecolor="black", linestyle="none")
    ax.plot([], [], marker="*", markersize=11, color="white", markeredgecolor="black", linestyle="none",
            label="where the reported figure is read")
    chance_line(ax, runs["_chance"].iloc[0] if "_chance" in runs else None)
    ax.set_xlabel("inner-loop steps on the support set")
    ax.set_ylabel(metric_label(runs.metric.iloc[0], bool(runs.higher_is_better.iloc[0])))
    ax.set_title(f"{task}: {k}-shot adaptation curves, mean ± 95% CI")
    legend_outside(ax)
    return save(fig, out_dir / f"{task}_adaptation.png")


def training_curves(task: str, runs: pd.DataFrame, out_dir: Path) -> Path:
    """Per algorithm (their losses differ in kind: MAML's query loss after adaptation, Reptile's support loss,
    ProtoNet's prototype loss): the meta-training loss on top, the validation metric below."""
    algorithms = sorted(runs.algorithm.unique())
    fig = Figure(figsize=(4.2 * len(algorithms) + 2, 6), layout="constrained")
    axes = fig.subplots(2, len(algorithms), squeeze=False, sharex="col")
    for column, algorithm in enumerate(algorithms):
        loss_ax, val_ax = axes[0, column], axes[1, column]
        for i, (_, run) in enumerate(runs[runs.algorithm == algorithm].iterrows()):
            history = Path(run.job_dir) / "history.csv"
            if not history.exists():
                continue
            frame = pd.read_csv(history)
            window = max(1, len(frame) // 50)
            loss_ax.plot(frame.iteration, frame.loss.rolling(window, min_periods=1).mean(), color=colour(i),
                         label=f"seed {run.seed}{' ' + run.config if run.config else ''}")
            checks = frame.dropna(subset=["val_metric"])
            val_ax.plot(checks.iteration, checks.val_metric, marker=".", color=colour(i))
        loss_ax.set_yscale("log")
        loss_ax.set_title(algorithm)
        loss_ax.set_ylabel(f"{algorithm} meta-training loss\n(moving average, log scale)")
        val_ax.set_ylabel(f"validation {runs.metric.iloc[0]}")
        val_ax.set_xlabel("meta-iteration")
        if len(loss_ax.get_lines()) > 1:  # one run needs no legend: the title names it
            loss_ax.legend(fontsize=7)
    fig.suptitle(f"{task}: meta-training and validation")
    return save(fig, out_dir / f"{task}_training_curves.png")


def efficiency(task: str, table: pd.DataFrame, k: str, out_dir: Path) -> Path:
    """K-shot figure (± 95% CI) against the parameters adapted per task, log scale."""
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.subplots()
    for i, name in enumerate(labels(table)):
        ax.errorbar(table["adapted params"].iloc[i], table[f"_{k}-shot mean"].iloc[i],
                    yerr=table[f"_{k}-shot ci95"].iloc[i], fmt="o", capsize=3, color=colour(i), label=name)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, numticks=6))
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor tick labels collide on a log axis
    ax.set_xlabel("parameters adapted per task (log scale)")
    ax.set_ylabel(metric_label(table.metric.iloc[0], bool(table.metric.iloc[0] == "accuracy")))
    chance_line(ax, table["_chance"].iloc[0] if "_chance" in table else None)
    ax.set_title(f"{task}: {k}-shot figure against adapted parameters")
    legend_outside(ax)
    return save(fig, out_dir / f"{task}_efficiency.png")


def time_per_iteration(task: str, table: pd.DataFrame, out_dir: Path) -> Path:
    names = labels(table)
    fig = Figure(figsize=(max(5.0, 0.8 * len(names) + 2), 4.2), layout="constrained")
    ax = fig.subplots()
    ax.bar(np.arange(len(names)), 1e3 * table["s/iteration"], color=[colour(i) for i in range(len(names))],
           edgecolor="black", linewidth=0.5)
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("milliseconds per meta-iteration\n(lower is better; first iteration left out)")
    ax.set_title(f"{task}: meta-training time per iteration")
    return save(fig, out_dir / f"{task}_time_per_iteration.png")


def plot_all(frame: pd.DataFrame, table: pd.DataFrame, out_dir: Path,
             eval_shots: Callable[[pd.DataFrame], list[str]]) -> list[Path]:
    plots = []
    done = frame[frame.status == "completed"]
    for task, task_table in table[table.completed > 0].groupby("task"):
        runs = done[done.task == task]
        shots = [k for k in eval_shots(runs)
                 if f"_{k}-shot mean" in task_table and task_table[f"_{k}-shot mean"].notna().any()]
        middle = shots[len(shots) // 2]
        plots.append(kshot(task, task_table, shots, out_dir))
        plots.append(training_curves(task, runs, out_dir))
        plots.append(efficiency(task, task_table.dropna(subset=[f"_{middle}-shot mean"]), middle, out_dir))
        plots.append(adaptation(task, runs, middle, out_dir))
        plots.append(time_per_iteration(task, task_table, out_dir))
    return plots
