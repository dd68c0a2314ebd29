"""What the outer loop should learn, in one table: runs that differ only in ``algorithm.meta_learn``, each scored
with the same fine-tuning procedure on the same test episodes.

Every run must have been made with ``evaluation.finetune_meta_learned=true`` (its meta-learned start fine-tuned
with Adam, the learning rate and step count chosen on meta-validation tasks) and share everything but
``algorithm.meta_learn``: the table checks that their ``finetune`` baselines (the multi-task pretrained backbone
fine-tuned the same way) scored identically, task by task. Columns: that baseline ("retrained"), each run's
fine-tuned meta-learned start, the ``oracle`` baseline where the task family has one, and the paired difference
of the best meta-learned row to the retrained one (positive: meta-learning is better), with 95% CIs over test
tasks. ``python runners/meta_learn_table.py RUN_OR_SWEEP_DIR ...`` prints it; ``experiment=low_rank_study`` writes
it when its sweep ends (``MetaLearnTable``).
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
from metapeft.stats import mean_ci95

log = logging.getLogger("metapeft.meta_learn_report")


def run_dirs(paths: list[Path]) -> list[Path]:
    """Run directories: each path itself, or the job directories of a sweep directory."""
    found = []
    for path in paths:
        found += [path] if (path / "metrics.json").is_file() else sorted(p.parent for p in path.glob("*/metrics.json"))
    return found


def load_runs(paths: list[Path]) -> dict[str, dict]:
    """meta_learn -> metrics.json of each finished run made with evaluation.finetune_meta_learned=true."""
    runs = {}
    for run_dir in run_dirs(paths):
        config = run_dir / "checkpoint" / "config.yaml"
        metrics = io.read_json(run_dir / "metrics.json")
        shots = metrics.get("evaluation", {}).get("shots", {})
        if metrics.get("status") != "completed" or not config.is_file():
            raise ConfigError("runs", f"{run_dir} is not a completed run (status {metrics.get('status')})")
        if "meta_learned_finetuned" not in next(iter(shots.values())):
            raise ConfigError("runs", f"{run_dir} was not run with evaluation.finetune_meta_learned=true")
        runs[str(OmegaConf.load(config).algorithm.get("meta_learn", "adapter"))] = metrics
    if not runs:
        raise ConfigError("runs", f"no run directory under {[str(p) for p in paths]}")
    return dict(sorted(runs.items()))


def cell(values) -> str:
    mean, ci = mean_ci95(np.asarray(values))
    return f"{mean:.4f} ± {ci:.4f}"


def table(runs: dict[str, dict]) -> str:
    first = next(iter(runs.values()))["evaluation"]
    higher = first["higher_is_better"]
    has_oracle = "oracle" in next(iter(first["shots"].values()))["baselines"]
    rows = ["| K | retrained (finetune) | " + " | ".join(f"meta_learn={name}" for name in runs) +
            (" | oracle" if has_oracle else "") + " | best meta-learned − retrained |",
            "|---|---|" + "---|" * len(runs) + ("---|" if has_oracle else "") + "---|"]
    for k, shot in first["shots"].items():
        retrained = np.asarray(shot["baselines"]["finetune"]["per_task"])
        ours = {}
        for name, metrics in runs.items():
            theirs = metrics["evaluation"]["shots"].get(k)
            if theirs is None or not np.array_equal(np.asarray(theirs["baselines"]["finetune"]["per_task"]), retrained):
                raise ConfigError("runs", f"the runs were not scored on the same episodes (K={k}: their finetune "
                                  "baselines differ); compare runs that differ only in algorithm.meta_learn")
            ours[name] = np.asarray(theirs["meta_learned_finetuned"]["per_task"])
        best = (max if higher else min)(ours, key=lambda name: ours[name].mean())
        mean, ci = mean_ci95((ours[best] - retrained) if higher else (retrained - ours[best]))
        oracle = f" | {cell(shot['baselines']['oracle']['per_task'])}" if has_oracle else ""
        rows.append(f"| {k} | {cell(retrained)} | " + " | ".join(cell(v) for v in ours.values()) + oracle +
                    f" | {best}: {mean:+.4f} ± {ci:.4f} |")
    return (f"{first['metric']} ({'higher' if higher else 'lower'} is better) after fine-tuning on K examples, mean ± "
            f"95% CI over {first['num_tasks']} test tasks\n\n" + "\n".join(rows) + "\n")


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
        log.info("what the outer loop learns (%s):\n%s", sweep_dir / "meta_learn_table.md", text)
