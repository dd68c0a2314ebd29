"""What the outer loop should learn, in one table: runs that differ only in ``algorithm.meta_learn``, each scored
with the same fine-tuning procedure on the same test episodes.

    python runners/meta_learn_table.py RUN_DIR [RUN_DIR ...] [--out FILE.md]

Every run must have been made with ``evaluation.finetune_meta_learned=true`` (its meta-learned start fine-tuned
with Adam, the learning rate and step count chosen on meta-validation tasks) and share everything but
``algorithm.meta_learn``: the table checks that their ``finetune`` baselines (the multi-task pretrained backbone
fine-tuned the same way) scored identically, task by task. Columns: that baseline ("retrained"), each run's
fine-tuned meta-learned start, the ``oracle`` baseline where the task family has one, and the paired difference
of the best meta-learned row to the retrained one (positive: meta-learning is better), with 95% CIs over test
tasks.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from metapeft.io import read_json, write_text
from metapeft.stats import mean_ci95


def load(run_dir: Path) -> tuple[str, dict]:
    metrics = read_json(run_dir / "metrics.json")
    cfg = OmegaConf.load(run_dir / "checkpoint" / "config.yaml")
    return str(cfg.algorithm.get("meta_learn", "adapter")), metrics


def cell(values, higher_is_better: bool = False) -> str:
    mean, ci = mean_ci95(np.asarray(values))
    return f"{mean:.4f} ± {ci:.4f}"


def table(runs: dict[str, dict]) -> str:
    first = next(iter(runs.values()))["evaluation"]
    higher = first["higher_is_better"]
    rows = ["| K | retrained (finetune) | " + " | ".join(f"meta_learn={name}" for name in runs) +
            (" | oracle" if "oracle" in next(iter(first["shots"].values()))["baselines"] else "") +
            " | best meta-learned − retrained |",
            "|---|---|" + "---|" * len(runs) + ("---|" if "oracle" in next(iter(first["shots"].values()))["baselines"]
                                                else "") + "---|"]
    for k, shot in first["shots"].items():
        retrained = np.asarray(shot["baselines"]["finetune"]["per_task"])
        ours = {}
        for name, metrics in runs.items():
            theirs = metrics["evaluation"]["shots"][k]
            if not np.array_equal(np.asarray(theirs["baselines"]["finetune"]["per_task"]), retrained):
                raise SystemExit(f"error: the runs were not scored on the same episodes (K={k}: their finetune "
                                 "baselines differ); compare runs that differ only in algorithm.meta_learn")
            ours[name] = np.asarray(theirs["meta_learned_finetuned"]["per_task"])
        best = (max if higher else min)(ours, key=lambda name: ours[name].mean())
        difference = (ours[best] - retrained) if higher else (retrained - ours[best])
        mean, ci = mean_ci95(difference)
        oracle = f" | {cell(shot['baselines']['oracle']['per_task'])}" if "oracle" in shot["baselines"] else ""
        rows.append(f"| {k} | {cell(retrained)} | " + " | ".join(cell(v) for v in ours.values()) + oracle +
                    f" | {best}: {mean:+.4f} ± {ci:.4f} |")
    metric = first["metric"]
    return f"{metric} ({'higher' if higher else 'lower'} is better), mean ± 95% CI over {first['num_tasks']} " \
           "test tasks\n\n" + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories differing only in algorithm.meta_learn")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    runs = {}
    for run_dir in args.runs:
        if not (run_dir / "metrics.json").is_file() or not (run_dir / "checkpoint" / "config.yaml").is_file():
            parser.error(f"{run_dir} is not a finished run directory (no metrics.json or checkpoint/config.yaml)")
        name, metrics = load(run_dir)
        shots = metrics.get("evaluation", {}).get("shots", {})
        if not shots or "meta_learned_finetuned" not in next(iter(shots.values())):
            parser.error(f"{run_dir} was not run with evaluation.finetune_meta_learned=true")
        runs[name] = metrics
    text = table(runs)
    print(text)
    if args.out:
        write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
