"""The validation suite: checks on real runs that the framework does what it claims, each PASS or FAIL.

Every check reads figures from runs made by the suite itself (same seed, the chosen mode) and records them next to
its verdict, so a FAIL says what was measured. ``runners/validate.py`` prints the verdicts and writes them to
``outputs/validation/validation_results.json``.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from metapeft.api import LearnedInitialization, load_run
from metapeft.backend import mx
from metapeft.build import build
from metapeft.embeddings import MEASURES, fisher_embedding, plot_similarity, similarity_matrix, statistics_embedding
from metapeft.experiment import run
from metapeft.registry import PEFT_METHODS
from metapeft.stats import difference_ci95
from metapeft.tasks.digits import rotated_digit_classes
from metapeft.transfer import transfer_study
from metapeft.trees import count

Compose = Callable[..., object]  # (*overrides, config_name=...) -> composed config


@dataclass
class Suite:
    """The runs the checks share, made on first use: MAML runs of the chosen mode on each task a check needs."""

    compose: Compose
    out_dir: Path
    common: tuple[str, ...] = ()  # overrides every run of the suite gets, e.g. mode=full seed=1 algorithm=reptile
    _shared: dict = field(default_factory=dict)  # made on first use: task -> (metrics, run); the embeddings

    def overrides(self, *extra: str) -> list[str]:
        return [*self.common, "progress=false", *extra]

    def run(self, task: str) -> tuple[dict, LearnedInitialization]:
        if task not in self._shared:
            metrics = run(self.compose(*self.overrides(f"task={task}")), self.out_dir / task)
            self._shared[task] = metrics, load_run(self.out_dir / task)
        return self._shared[task]

    def sinusoid_embeddings(self) -> tuple[list[str], list[np.ndarray], int]:
        """Computed once: the embeddings and the similarity checks both read them."""
        if "sinusoid_embeddings" not in self._shared:
            self._shared["sinusoid_embeddings"] = sinusoid_embeddings(self)
        return self._shared["sinusoid_embeddings"]


def check_convergence(suite: Suite) -> tuple[bool, dict]:
    """Meta-training loss falls: mean over the last tenth of iterations below the first tenth, on both tasks."""
    measured = {}
    for task in ("sinusoid", "digits"):
        suite.run(task)
        loss = pd.read_csv(suite.out_dir / task / "history.csv")["loss"].to_numpy()
        tenth = max(1, len(loss) // 10)
        measured[task] = {"first_tenth_loss": float(loss[:tenth].mean()),
                          "last_tenth_loss": float(loss[-tenth:].mean())}
    return all(m["last_tenth_loss"] < m["first_tenth_loss"] for m in measured.values()), measured


def check_few_shot(suite: Suite) -> tuple[bool, dict]:
    """5-shot beats 1-shot by more than the 95% CI of the difference (the same meta-test classes at both K: class
    effects cancel; independent tasks on sinusoid), on sinusoid and the many-class glyphs. Not on digits: 100
    quick-mode tasks from 7 classes of 5 digits cannot establish it (gain 0.05, CI 0.19 at seed 0)."""
    measured, passed = {}, True
    for task in ("sinusoid", "glyphs"):
        metrics, _ = suite.run(task)
        evaluation = metrics["evaluation"]
        one, five = evaluation["shots"]["1"], evaluation["shots"]["5"]
        sign = 1.0 if evaluation["higher_is_better"] else -1.0
        gain, ci = difference_ci95(sign * np.array(five["meta_learned"]["per_task"]), five.get("task_sources"),
                                   sign * np.array(one["meta_learned"]["per_task"]), one.get("task_sources"))
        measured[task] = {"metric": evaluation["metric"], "1-shot": one["meta_learned"]["mean"],
                          "5-shot": five["meta_learned"]["mean"], "gain": gain, "gain_ci95": ci}
        passed &= gain > ci
    return passed, measured


def check_parameter_efficiency(suite: Suite) -> tuple[bool, dict]:
    """Every PEFT method adapts more than 2x fewer parameters than full fine-tuning of the same transformer."""
    measured = {}
    for task in ("sinusoid", "digits"):
        def adapted(method: str) -> int:
            exp = build(suite.compose(*suite.overrides(f"task={task}", f"peft={method}", "model=transformer")))
            backbone = exp.model.init(mx.random.key(0))
            inputs, _ = exp.task.pretraining_batch(np.random.default_rng(0), 8)
            return count(exp.peft.init_adapted(backbone, mx.random.key(1), inputs))

        full = adapted("none")
        measured[task] = {"full_fine_tuning": full, **{m: adapted(m) for m in PEFT_METHODS.names() if m != "none"}}
    passed = all(counts["full_fine_tuning"] > 2 * n for counts in measured.values()
                 for method, n in counts.items() if method != "full_fine_tuning")
    return passed, measured


def sinusoid_embeddings(suite: Suite) -> tuple[list[str], list[np.ndarray], int]:
    """Fisher embeddings of six sinusoid tasks in three pairs of nearby amplitude and phase."""
    _, learned = suite.run("sinusoid")
    x = mx.array(np.linspace(-5, 5, 10, dtype=np.float32)[:, None])
    tasks = {"A=1.0 φ=0.5": (1.0, 0.5), "A=1.2 φ=0.6": (1.2, 0.6), "A=2.5 φ=1.5": (2.5, 1.5),
             "A=2.7 φ=1.6": (2.7, 1.6), "A=4.5 φ=2.8": (4.5, 2.8), "A=4.7 φ=2.9": (4.7, 2.9)}
    embeddings = [fisher_embedding(learned.experiment, learned.meta, learned.frozen, x,
                                   mx.array(a * np.sin(np.array(x) - p))) for a, p in tasks.values()]
    return list(tasks), embeddings, count(learned.meta["weights"])


def check_task_embeddings(suite: Suite) -> tuple[bool, dict]:
    """Embeddings are produced, finite, one entry per adapted parameter, and discriminative: nearby sinusoids are
    more similar than distant ones; digit tasks sharing their classes more than tasks of other classes."""
    _, embeddings, num_adapted = suite.sinusoid_embeddings()
    similarity = similarity_matrix(embeddings)
    sinusoid_ok = all(similarity[i, i + 1] > max(similarity[i, j] for j in range(6) if j // 2 != i // 2)
                      for i in (0, 2, 4))
    _, learned = suite.run("digits")
    classes = list(rotated_digit_classes().values())
    rng = np.random.default_rng(0)
    n_way = learned.experiment.task.output_dim

    def task(class_ids):
        images = [classes[c][rng.choice(len(classes[c]), 5, replace=False)] for c in class_ids]
        return mx.array(np.concatenate(images)), mx.array(np.repeat(np.arange(n_way, dtype=np.int32), 5))

    first, same, other = task(range(n_way)), task(range(n_way)), task(range(10, 10 + n_way))
    digits = {}
    for name, embed in (("fisher", lambda t: fisher_embedding(learned.experiment, learned.meta, learned.frozen, *t)),
                        ("statistics", lambda t: statistics_embedding(*t, num_classes=n_way))):
        s = similarity_matrix([embed(first), embed(same), embed(other)])
        digits[name] = {"same_classes": float(s[0, 1]), "other_classes": float(s[0, 2])}
    shapes_ok = all(e.shape == (num_adapted,) and np.isfinite(e).all() for e in embeddings)
    passed = shapes_ok and sinusoid_ok and all(d["same_classes"] > d["other_classes"] for d in digits.values())
    return passed, {"shape": [num_adapted], "finite_and_shaped": shapes_ok, "sinusoid_nearby_most_similar": sinusoid_ok,
                    "digits": digits}


def check_task_similarity(suite: Suite) -> tuple[bool, dict]:
    """Both similarity measures give symmetric matrices with unit diagonal that rank nearby tasks above distant
    ones on average; the heatmaps are written."""
    labels, embeddings, _ = suite.sinusoid_embeddings()
    pair = np.array([[i // 2 == j // 2 for j in range(6)] for i in range(6)]) & ~np.eye(6, dtype=bool)
    far = ~pair & ~np.eye(6, dtype=bool)
    measured = {}
    for measure in MEASURES:
        s = similarity_matrix(embeddings, measure)
        plot_similarity(s, labels, suite.out_dir / f"similarity_{measure}.png", f"sinusoid tasks, {measure}")
        measured[measure] = {"symmetric": bool(np.allclose(s, s.T)), "unit_diagonal": bool(np.allclose(np.diag(s), 1)),
                             "nearby_mean": float(s[pair].mean()), "distant_mean": float(s[far].mean()),
                             "heatmap": str(suite.out_dir / f"similarity_{measure}.png")}
    passed = all(m["symmetric"] and m["unit_diagonal"] and m["nearby_mean"] > m["distant_mean"]
                 for m in measured.values())
    return passed, measured


def check_cross_task_transfer(suite: Suite) -> tuple[bool, dict]:
    """Meta-trained on low-amplitude sinusoids, 5-shot MSE on high-amplitude ones beats plain_init outside the CI."""
    result = transfer_study(suite.compose(*suite.overrides(), config_name="transfer_study"), suite.out_dir / "transfer")
    cells = {f"{c['source']} -> {c['target']}": {"gain": c["gain"], "gain_ci95": c["gain_ci95"]}
             for c in result["matrix"]}
    claim = cells["low_amplitude -> high_amplitude"]
    return claim["gain"] - claim["gain_ci95"] > 0, {"claim": "low_amplitude -> high_amplitude", "cells": cells,
                                                    "transfer_json": str(suite.out_dir / "transfer" / "transfer.json")}


def check_save_load(suite: Suite) -> tuple[bool, dict]:
    """Evaluating the saved sinusoid run (train=false) reproduces its test metrics exactly."""
    trained, _ = suite.run("sinusoid")
    command_line = ["train=false", f"checkpoint={suite.out_dir / 'sinusoid'}"]
    reloaded = run(suite.compose(*command_line, "progress=false"), suite.out_dir / "reloaded", overrides=command_line)
    same = reloaded["evaluation"] == trained["evaluation"]
    return same, {"identical_evaluation": same, "5-shot": [trained["evaluation"]["shots"]["5"]["meta_learned"]["mean"],
                                                           reloaded["evaluation"]["shots"]["5"]["meta_learned"]["mean"]]}


CHECKS = {
    "convergence": check_convergence,
    "few_shot": check_few_shot,
    "parameter_efficiency": check_parameter_efficiency,
    "task_embeddings": check_task_embeddings,
    "task_similarity": check_task_similarity,
    "cross_task_transfer": check_cross_task_transfer,
    "save_load": check_save_load,
}


def validate(suite: Suite, report: Callable[[str, dict], None] = lambda name, result: None) -> dict:
    """Run every check; an exception is that check's FAIL, and the others still run."""
    results = {}
    for name, check in CHECKS.items():
        try:
            passed, measured = check(suite)
            results[name] = {"status": "PASS" if passed else "FAIL", "claim": check.__doc__.strip(),
                             "measured": measured}
        except Exception as error:  # noqa: BLE001 - a crashing check is a failing check
            results[name] = {"status": "FAIL", "claim": check.__doc__.strip(),
                             "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        report(name, results[name])
    return {"overrides": list(suite.common), "runs": str(suite.out_dir),
            "passed": all(r["status"] == "PASS" for r in results.values()), "checks": results}
