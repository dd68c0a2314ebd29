"""The comparison plots of ``runners/aggregate.py``, drawn to be printed: constrained layout with legends outside
the data, the best baseline beside every meta-learned figure at every K, chance level on accuracy axes, 95% CIs
wherever a mean is shown, the inner-step budget marked on adaptation curves, each algorithm's training loss on its
own axes above its validation metric, a colour-blind-safe palette (Okabe and Ito), and PNG plus PDF."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter

from metapeft import io

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
BASELINE_GREY = "#999999"


def colour(i: int) -> str:
    return OKABE_ITO[i % len(OKABE_ITO)]


def labels(table: pd.DataFrame) -> list[str]:
    """Each configuration's name with the overrides that tell it apart (those every row shares are left to
    ``shared_overrides``), wrapped so that long ones stay readable."""
    shared = set(shared_overrides(table).split())
    names = []
    for r in table.itertuples():
        own = " ".join(o for o in (r.config or "").split() if o not in shared)
        names.append(f"{r.algorithm}+{r.peft} ({r.model})" + ("\n" + textwrap.fill(own, 34) if own else ""))
    return names


def shared_overrides(table: pd.DataFrame) -> str:
    configs = [set((c or "").split()) for c in table.config]
    return " ".join(sorted(set.intersection(*configs))) if configs else ""


def run_label(run) -> str:
    return f"{run.algorithm}+{run.peft} ({run.model}) seed {run.seed}"


def save(fig: Figure, path: Path) -> Path:
    """PNG for screens, PDF for papers."""
    # Constrained layout places everything; the tight bounding box keeps legends outside the axes in the file.
    io.save_figure(fig, path.with_suffix(".png"), dpi=150, bbox_inches="tight")
    io.save_figure(fig, path.with_suffix(".pdf"), bbox_inches="tight")
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
    """One panel per K: each configuration's meta-learned figure under its best baseline, with 95% CIs."""
    names, higher = labels(table), bool(table.metric.iloc[0] == "accuracy")
    y = np.arange(len(names))
    lines = sum(n.count("\n") + 1 for n in names)
    fig = Figure(figsize=(3.2 * len(shots) + 4, 1.2 + 0.32 * lines + 0.25 * len(names)), layout="constrained")
    axes = fig.subplots(1, len(shots), sharey=True, squeeze=False)[0]
    for ax, k in zip(axes, shots):
        if f"_{k}-shot baseline mean" in table:
            ax.barh(y - 0.2, table[f"_{k}-shot baseline mean"], 0.4, xerr=table[f"_{k}-shot baseline ci95"],
                    capsize=3, color=BASELINE_GREY, hatch="//", edgecolor="black", linewidth=0.5,
                    label="best baseline, same episodes")
        ax.barh(y + 0.2, table[f"_{k}-shot mean"], 0.4, xerr=table[f"_{k}-shot ci95"], capsize=3, color=colour(0),
                edgecolor="black", linewidth=0.5, label="meta-learned")
        chance = table["_chance"].iloc[0] if "_chance" in table else None
        if chance:
            ax.axvline(chance, color="black", linestyle=":", linewidth=1, label=f"chance ({chance:.2f})")
        ax.set_title(f"{k}-shot")
        ax.set_xlabel(metric_label(table.metric.iloc[0], higher), fontsize=8)
    axes[0].set_yticks(y, names, fontsize=8)
    axes[0].invert_yaxis()
    legend_outside(axes[-1])
    shared = shared_overrides(table)
    fig.suptitle(f"{task}: mean ± 95% CI (the table's: over seeds and test classes)" +
                 (f"\n(all: {shared})" if shared else ""), fontsize=10)
    return save(fig, out_dir / f"{task}_kshot.png")


def paired(task: str, table: pd.DataFrame, shots: list[str], out_dir: Path) -> Path:
    """One panel per K: each configuration's paired difference to its best baseline on the same episodes (positive:
    better), mean ± 95% CI over its seeds, every seed's own mean difference as a dot, zero marked."""
    names = labels(table)
    y = np.arange(len(names))
    lines = sum(n.count("\n") + 1 for n in names)
    fig = Figure(figsize=(3.2 * len(shots) + 3, 1.4 + 0.32 * lines + 0.25 * len(names)), layout="constrained")
    axes = fig.subplots(1, len(shots), sharey=True, squeeze=False)[0]
    for ax, k in zip(axes, shots):
        ax.axvline(0.0, color="black", linewidth=1)
        if f"_{k}-shot difference" not in table:
            continue
        ax.errorbar(table[f"_{k}-shot difference"], y, xerr=table[f"_{k}-shot difference ci95"], fmt="o", capsize=4,
                    color=colour(0), label="mean ± 95% CI")
        for i, seeds in enumerate(table[f"_{k}-shot difference by seed"]):
            if isinstance(seeds, list):
                ax.plot(seeds, [i + 0.15] * len(seeds), "|", color=colour(1), markersize=9,
                        label="each seed" if i == 0 else None)
        ax.set_title(f"{k}-shot")
        ax.set_xlabel("difference to the best baseline\n(positive: meta-learned better)", fontsize=8)
    axes[0].set_yticks(y, names, fontsize=8)
    axes[0].set_ylim(len(names) - 0.5, -0.5)  # first row on top, each row's seeds just below its interval
    legend_outside(axes[-1])
    fig.suptitle(f"{task}: paired difference to the best baseline, over seeds and test classes", fontsize=10)
    return save(fig, out_dir / f"{task}_paired.png")


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
        val_ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # five-digit iteration numbers collide otherwise
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
    lines = sum(n.count("\n") + 1 for n in names)
    fig = Figure(figsize=(8, 1.2 + 0.32 * lines + 0.25 * len(names)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(names))
    ax.barh(y, 1e3 * table["s/iteration"], color=[colour(i) for i in range(len(names))], edgecolor="black",
            linewidth=0.5)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds per meta-iteration (lower is better; first iteration left out)")
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
        plots.append(paired(task, task_table, shots, out_dir))
        plots.append(training_curves(task, runs, out_dir))
        plots.append(efficiency(task, task_table.dropna(subset=[f"_{middle}-shot mean"]), middle, out_dir))
        plots.append(adaptation(task, runs, middle, out_dir))
        plots.append(time_per_iteration(task, task_table, out_dir))
    return plots
