"""Learning is real: in quick mode, meta-learning beats its plain initialization by more than the CIs."""
from __future__ import annotations

from metapeft.experiment import run


def gap_beyond_ci(metrics: dict, k: str) -> float:
    """How far the meta-learned result is better than plain_init, beyond both 95% CIs (> 0: clearly better)."""
    evaluation = metrics["evaluation"]
    ours, base = evaluation["shots"][k]["meta_learned"], evaluation["shots"][k]["baselines"]["plain_init"]
    gap = ours["mean"] - base["mean"] if evaluation["higher_is_better"] else base["mean"] - ours["mean"]
    return gap - ours["ci95"] - base["ci95"]


def test_maml_sinusoid_5shot_beats_its_plain_initialization(compose_cfg, tmp_path):
    metrics = run(compose_cfg("algorithm=maml", "task=sinusoid", "shots=5shot", "mode=quick"), tmp_path)
    assert gap_beyond_ci(metrics, "5") > 0, metrics["evaluation"]["shots"]["5"]


def test_maml_digits_5way_5shot_beats_its_plain_initialization(compose_cfg, tmp_path):
    metrics = run(compose_cfg("algorithm=maml", "task=digits", "shots=5shot", "mode=quick"), tmp_path)
    assert gap_beyond_ci(metrics, "5") > 0, metrics["evaluation"]["shots"]["5"]
