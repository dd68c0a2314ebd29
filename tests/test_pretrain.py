"""The pretrained-backbone cache: keyed by what determines the weights, safe under concurrent jobs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from helpers import REPO
from metapeft.build import build
from metapeft.pretrain import pretrained_backbone

SMALL = ["peft=lora", "task=digits", "pretrain.iterations=30", "pretrain.batch_size=32"]


def pretrain(compose_cfg, cache, *overrides):
    cfg = compose_cfg(*SMALL, f"pretrain.cache_dir={cache}", *overrides)
    exp = build(cfg)
    return pretrained_backbone(cfg, type(exp.model), exp.task, mx.random.key(cfg.seed), progress=False)


def same(a, b):
    a, b = dict(tree_flatten(a)), dict(tree_flatten(b))
    return a.keys() == b.keys() and all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)


def test_pretraining_is_cached_by_what_determines_it(compose_cfg, tmp_path):
    first, info = pretrain(compose_cfg, tmp_path)
    again, info_again = pretrain(compose_cfg, tmp_path, "algorithm=reptile", "peft=adalora")  # irrelevant to weights
    assert (info["cache_hit"], info_again["cache_hit"]) == (False, True) and same(first, again)
    assert first["head"]["weight"].shape == (32, 18)  # supervised over the 18 meta-train classes
    other, info_other = pretrain(compose_cfg, tmp_path, "seed=1")
    assert not info_other["cache_hit"] and not same(first, other)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    held, info_held = pretrain(compose_cfg, tmp_path, "seed=1", "pretrain.seed=0")  # one backbone for every seed
    assert info_held["cache_hit"] and info_held["seed"] == 0 and same(first, held)


WORKER = """
import json, sys
from metapeft.pretrain import pretrained_backbone
from metapeft.build import build
from tests.helpers import compose_config
from metapeft.backend import mx
cfg = compose_config(*sys.argv[1:])
exp = build(cfg)
params, info = pretrained_backbone(cfg, type(exp.model), exp.task, mx.random.key(cfg.seed), progress=False)
print(json.dumps({"hit": info["cache_hit"], "sum": float(params["embed"]["weight"].sum().item())}))
"""


def test_concurrent_jobs_pretrain_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [*SMALL, "pretrain.iterations=200", f"pretrain.cache_dir={tmp_path}", "progress=false"]
    jobs = [subprocess.Popen([sys.executable, "-c", WORKER, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for job in jobs:
        out, err = job.communicate(timeout=300)
        assert job.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["hit"] for r in results) == [False, True]  # one trained, the other waited and loaded
    assert results[0]["sum"] == results[1]["sum"]
    assert len(list(tmp_path.glob("*.safetensors"))) == 1 and not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("model", ["transformer", "conv4"])  # conv4: quick mode's budget file cuts its cap further
def test_quick_and_full_mode_never_share_a_cached_backbone(compose_cfg, model):
    from metapeft.pretrain import cache_key, numerics

    keys = {mode: cache_key(compose_cfg(*SMALL[:2], f"model={model}", f"mode={mode}"), numerics())
            for mode in ("tiny", "quick", "full")}
    assert len(set(keys.values())) == 3  # each mode's pretraining budget is part of the key


def test_two_blas_thread_counts_give_the_same_backbone_or_different_cache_entries(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [*SMALL, "pretrain.iterations=60", f"pretrain.cache_dir={tmp_path}", "progress=false"]
    results = []
    for threads in ("1", "2"):
        done = subprocess.run([sys.executable, "-c", WORKER, *args], cwd=REPO, capture_output=True, text=True,
                              env={**env, "METAPEFT_BLAS_THREADS": threads}, timeout=300)
        assert done.returncode == 0, done.stderr
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    files = list(tmp_path.glob("*.safetensors"))
    assert results[0]["sum"] == results[1]["sum"] or (len(files) == 2 and not results[1]["hit"])


def test_a_damaged_cache_file_is_pretrained_again_not_a_failed_run(compose_cfg, tmp_path):
    first, _ = pretrain(compose_cfg, tmp_path)
    mx.eval(first)  # read before the file is damaged (MLX loads lazily)
    (path,) = tmp_path.glob("*.safetensors")
    intact = path.read_bytes()
    path.write_bytes(intact[: len(intact) // 2])
    again, info = pretrain(compose_cfg, tmp_path)
    assert not info["cache_hit"] and same(first, again)  # pretraining is deterministic: the same weights
    assert path.read_bytes() == intact



def test_pretraining_stops_when_validation_stalls_and_keeps_the_best_validated_weights(compose_cfg, tmp_path):
    from metapeft.pretrain import feature_score

    # a learning rate far too high: validation soon stops improving, and patience=2 ends training early
    params, facts = pretrain(compose_cfg, tmp_path, "pretrain.iterations=400", "pretrain.val_interval=10",
                             "pretrain.patience=2", "pretrain.lr=0.5", "pretrain.num_val_tasks=20")
    assert facts["stopped"].startswith("no better validation in 2") and facts["iterations"] < 400
    assert facts["iterations"] - facts["best_iteration"] == 2 * 10
    assert [row["iteration"] for row in facts["history"]] == list(range(10, facts["iterations"] + 1, 10))
    assert facts["best_val_metric"] == max(row["val_metric"] for row in facts["history"])
    cfg = compose_cfg(*SMALL, "pretrain.num_val_tasks=20")
    exp = build(cfg)
    val = exp.task.sample("val", 20, cfg.shots.train, np.random.default_rng([cfg.seed, 5]))
    model = type(exp.model)(cfg.model, exp.task.input_shape, exp.task.pretraining_outputs)
    assert feature_score(model, exp.task, params, val) == pytest.approx(facts["best_val_metric"], abs=1e-6)
    _, again = pretrain(compose_cfg, tmp_path, "pretrain.iterations=400", "pretrain.val_interval=10",
                        "pretrain.patience=2", "pretrain.lr=0.5", "pretrain.num_val_tasks=20")
    assert again["cache_hit"] and again["best_iteration"] == facts["best_iteration"]  # the facts travel with it
