"""Hyperparameter search with the Optuna sweeper: the objective is the run's validation metric."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from helpers import REPO
from metapeft.experiment import run

SMALL = ["task=sinusoid", "mode.num_iterations=100", "mode.val_interval=50", "mode.num_eval_tasks=10",
         "pretrain.iterations=50", "progress=false"]


@pytest.mark.slow
def test_optuna_finds_a_better_learning_rate_than_a_bad_start(compose_cfg, tmp_path):
    cache = f"pretrain.cache_dir={tmp_path / 'cache'}"
    bad = run(compose_cfg(*SMALL, cache, "peft=lora", "algorithm.inner_lr=0.0001", "algorithm.outer_lr=0.0001"),
              tmp_path / "bad")["train"]["final_val_metric"]
    result = subprocess.run([sys.executable, "runners/run.py", "experiment=hpo_lora", *SMALL, cache,
                             "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={tmp_path / 'search'}"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "search" / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"algorithm.inner_lr", "algorithm.outer_lr", "peft.rank"}
    assert best["best_value"] < bad  # validation MSE: lower is better
    assert len(list((tmp_path / "search").glob("*/metrics.json"))) == 4  # the trials are ordinary runs
