"""Learning is real: in quick mode, meta-learning beats its plain initialization on the same tasks by more than
the class-aware 95% CI of the paired difference."""
from __future__ import annotations

import numpy as np

from metapeft.experiment import run
from metapeft.stats import mean_ci95


def gap_beyond_ci(metrics: dict, k: str) -> float:
    """How far the meta-learned result is better than plain_init, task by task, beyond the 95% CI (> 0: clearly)."""
    evaluation = metrics["evaluation"]
    shot = evaluation["shots"][k]
    ours, base = np.array(shot["meta_learned"]["per_task"]), np.array(shot["baselines"]["plain_init"]["per_task"])
    gap, ci = mean_ci95((ours - base) if evaluation["higher_is_better"] else (base - ours), shot.get("task_sources"))
    return gap - ci


def test_maml_sinusoid_5shot_beats_its_plain_initialization(compose_cfg, tmp_path):
    metrics = run(compose_cfg("algorithm=maml", "task=sinusoid", "shots=5shot", "mode=quick"), tmp_path)
    assert gap_beyond_ci(metrics, "5") > 0, metrics["evaluation"]["shots"]["5"]


def test_maml_digits_5way_5shot_beats_its_plain_initialization(compose_cfg, tmp_path):
    metrics = run(compose_cfg("algorithm=maml", "task=digits", "shots=5shot", "mode=quick"), tmp_path)
    assert gap_beyond_ci(metrics, "5") > 0, metrics["evaluation"]["shots"]["5"]
