"""What the outer loop should learn, in one table: runs that differ only in ``algorithm.meta_learn`` (and LoRA-ML's
joint fit, ``algorithm=lora_ml``, where given), each scored with the same fine-tuning procedure on the same test
episodes.

Every run must have been made with ``evaluation.finetune_meta_learned=true`` (its meta-learned start fine-tuned
with Adam, the learning rate and step count chosen on meta-validation tasks) and share everything but
``algorithm.meta_learn`` and the seed: the table checks that the runs of a seed scored their ``finetune`` baselines
(the multi-task pretrained backbone fine-tuned the same way) identically, task by task. Columns: that baseline
("retrained"), each run's fine-tuned meta-learned start, the ``oracle`` baseline where the task family has one, and
the paired difference of the best meta-learned row to the retrained one (positive: meta-learning is better), with
95% CIs over the seeds that count the variance between training runs (``metapeft.stats.seeds_ci95``; one seed:
over its test tasks only, and the caption says so); the figure draws them against K with every seed's mean.
``python runners/meta_learn_table.py RUN_OR_SWEEP_DIR ... [--out FILE.md]`` prints the table (and writes it with
the figure beside it); ``experiment=low_rank_study`` writes both when its sweep ends (``MetaLearnTable``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from metapeft import io
from metapeft.errors import ConfigError
from metapeft.stats import Interval, seeds_ci95

log = logging.getLogger("metapeft.meta_learn_report")


def run_dirs(paths: list[Path]) -> list[Path]:
    """Run directories: each path itself, or the job directories of a sweep directory."""
    found = []
    for path in paths:
        found += [path] if (path / "metrics.json").is_file() else sorted(p.parent for p in path.glob("*/metrics.json"))
    return found


def column_name(saved) -> str:
    """A run's column: ``meta_learn=<what the outer loop learned>``, or ``lora_ml`` (the joint objective)."""
    if saved.algorithm.name == "lora_ml":
        return "lora_ml"
    return f"meta_learn={saved.algorithm.get('meta_learn', 'adapter')}"


def load_runs(paths: list[Path]) -> dict[str, list[dict]]:
    """Column name (``column_name``) -> the metrics.json of each finished run (one per seed, in seed order) made
    with evaluation.finetune_meta_learned=true."""
    runs: dict[str, dict[int, dict]] = {}
    for run_dir in run_dirs(paths):
        config = run_dir / "checkpoint" / "config.yaml"
        metrics = io.read_json(run_dir / "metrics.json")
        shots = metrics.get("evaluation", {}).get("shots", {})
        if metrics.get("status") != "completed" or not config.is_file():
            raise ConfigError("runs", f"{run_dir} is not a completed run (status {metrics.get('status')})")
        if "meta_learned_finetuned" not in next(iter(shots.values())):
            raise ConfigError("runs", f"{run_dir} was not run with evaluation.finetune_meta_learned=true")
        saved = OmegaConf.load(config)
        by_seed = runs.setdefault(column_name(saved), {})
        if saved.seed in by_seed:
            raise ConfigError("runs", f"{run_dir}: a second run of seed {saved.seed} for {column_name(saved)}; give "
                              "runs that differ in algorithm.meta_learn (or are LoRA-ML) and seed only")
        by_seed[saved.seed] = metrics
    if not runs:
        raise ConfigError("runs", f"no run directory under {[str(p) for p in paths]}")
    seeds = {name: sorted(by_seed) for name, by_seed in runs.items()}
    first = next(iter(seeds.values()))
    if any(s != first for s in seeds.values()):
        raise ConfigError("runs", f"every column needs the same seeds, got {seeds}")
    return {name: [runs[name][seed] for seed in first] for name in sorted(runs, key=lambda n: (n == "lora_ml", n))}


def interval(values_by_seed: list, sources_by_seed: list | None) -> Interval:
    return seeds_ci95([np.asarray(v) for v in values_by_seed], sources_by_seed)


def cell(span: Interval) -> str:
    return f"{span.mean:.4f} ± {span.ci95:.4f}"


def columns(runs: dict[str, list[dict]]) -> tuple[dict, list[dict]]:
    """The evaluation header of the first run, and per K: the seeds' per-task values of every column (retrained,
    each meta_learn, oracle), each seed's task sources, and the best meta-learned column."""
    first = runs[next(iter(runs))][0]["evaluation"]
    higher = first["higher_is_better"]
    rows = []
    for k in first["shots"]:
        shots = {name: [m["evaluation"]["shots"].get(k) for m in seeds] for name, seeds in runs.items()}
        reference = shots[next(iter(shots))]
        retrained = [np.asarray(shot["baselines"]["finetune"]["per_task"]) for shot in reference]
        for per_seed in shots.values():
            for seed_shot, theirs in zip(per_seed, retrained):
                if seed_shot is None or not np.array_equal(
                        np.asarray(seed_shot["baselines"]["finetune"]["per_task"]), theirs):
                    raise ConfigError("runs", f"the runs were not scored on the same episodes (K={k}: their finetune "
                                      "baselines differ); compare runs that differ only in algorithm.meta_learn "
                                      "(and seed)")
        values = {"retrained (finetune)": retrained}
        values.update({name: [np.asarray(s["meta_learned_finetuned"]["per_task"]) for s in per_seed]
                       for name, per_seed in shots.items()})
        if "oracle" in reference[0]["baselines"]:
            values["oracle"] = [np.asarray(shot["baselines"]["oracle"]["per_task"]) for shot in reference]
        sources = [shot.get("task_sources") for shot in reference]
        sources = None if any(s is None for s in sources) else [np.asarray(s) for s in sources]
        learned = list(shots)
        best = (max if higher else min)(learned, key=lambda name: np.mean([v.mean() for v in values[name]]))
        rows.append({"K": k, "values": values, "sources": sources, "best": best})
    return first, rows


def table(runs: dict[str, list[dict]]) -> str:
    first, rows = columns(runs)
    higher = first["higher_is_better"]
    names = list(rows[0]["values"])
    lines = ["| K | " + " | ".join(names) + " | best meta-learned − retrained |", "|---|" + "---|" * (len(names) + 1)]
    for row in rows:
        values, sources, best = row["values"], row["sources"], row["best"]
        retrained = values["retrained (finetune)"]
        gain = interval([(o - r) if higher else (r - o) for o, r in zip(values[best], retrained)], sources)
        lines.append(f"| {row['K']} | " + " | ".join(cell(interval(v, sources)) for v in values.values()) +
                     f" | {best.removeprefix('meta_learn=')}: {gain.mean:+.4f} ± {gain.ci95:.4f} |")
    one = interval(rows[0]["values"]["retrained (finetune)"], rows[0]["sources"])
    seeds = len(next(iter(runs.values())))
    over = (f"{first['num_tasks']} test tasks of one seed (test tasks only: not the training run's variance)"
            if seeds == 1 else f"{seeds} seeds of {first['num_tasks']} test tasks each ({one.method})")
    return (f"{first['metric']} ({'higher' if higher else 'lower'} is better) after fine-tuning on K examples, mean ± "
            f"95% CI over {over}\n\n" + "\n".join(lines) + "\n")


def figure(runs: dict[str, list[dict]], path: Path) -> Path:
    """Each column's figure against K with its 95% interval, and every seed's mean as a dot."""
    from matplotlib.figure import Figure

    from metapeft.plots import colour, metric_label, save

    first, rows = columns(runs)
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    ks = np.array([int(row["K"]) for row in rows], dtype=float)
    for i, name in enumerate(rows[0]["values"]):
        spans = [interval(row["values"][name], row["sources"]) for row in rows]
        shift = ks * (1 + 0.03 * (i - 2))  # side by side on the log axis
        ax.errorbar(shift, [s.mean for s in spans], yerr=[s.ci95 for s in spans], fmt="o-", capsize=3,
                    color=colour(i), label=name)
        for x, row in zip(shift, rows):
            ax.plot([x] * len(row["values"][name]), [v.mean() for v in row["values"][name]], ".", color=colour(i),
                    alpha=0.4, markersize=4)
    ax.set_xscale("log")
    if not first["higher_is_better"]:  # an error spanning orders of magnitude (MSE); accuracy stays linear
        ax.set_yscale("log")
    ax.set_xticks(ks, [str(int(k)) for k in ks])
    ax.set_xlabel("K (examples per test task)")
    ax.set_ylabel(metric_label(first["metric"], first["higher_is_better"]))
    ax.set_title(f"after fine-tuning: mean ± 95% CI over {len(next(iter(runs.values())))} seeds (dots: each seed)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return save(fig, path)


class MetaLearnTable(Callback):
    """At the end of a sweep over ``algorithm.meta_learn``: the table, printed and written as
    ``<sweep dir>/meta_learn_table.md``."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            text = table(load_runs([sweep_dir]))
        except ConfigError as error:
            log.error("no meta_learn table: %s", error)
            return
        io.write_text(sweep_dir / "meta_learn_table.md", text)
        figure(load_runs([sweep_dir]), sweep_dir / "meta_learn_table.png")
        log.info("what the outer loop learns (%s):\n%s", sweep_dir / "meta_learn_table.md", text)
