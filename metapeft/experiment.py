"""One run: build from the config, meta-train, evaluate against the scratch baseline, write the run directory.

Data flows one way: config -> task family, backbone, PEFT split (adapted tree, frozen tree) -> algorithm
meta-training -> evaluation -> files (``metrics.json``, ``history.csv``, ``checkpoint/``).
"""
from __future__ import annotations

import math
import resource
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import numpy as np
import pandas as pd
from mlx.utils import tree_flatten
from omegaconf import DictConfig, OmegaConf

from metapeft import io
from metapeft.algorithms.base import MetaLearner, sgd_step
from metapeft.config import register_configs, validate_common
from metapeft.errors import ConfigError, DivergedError
from metapeft.evaluate import adaptation_curves, summarize
from metapeft.registry import ALGORITHMS, MODELS, PEFT_METHODS, TASKS
from metapeft.tasks.base import TaskFamily
from metapeft.train import TrainLog, meta_train

GROUPS = ("algorithm", "peft", "shots", "mode", "task", "model")


@dataclass
class Experiment:
    cfg: DictConfig
    task: TaskFamily
    model: Any
    peft: Any
    learner: MetaLearner

    def loss(self, adapted: dict, frozen: dict, x: mx.array, y: mx.array) -> mx.array:
        return self.task.loss(self.peft(adapted, frozen, x), y)

    def metric(self, adapted: dict, frozen: dict, x: mx.array, y: mx.array) -> mx.array:
        return self.task.metric(self.peft(adapted, frozen, x), y)


def build(cfg: DictConfig) -> Experiment:
    """Construct every component; each checks its own keys, so bad input fails here, before any training."""
    register_configs()
    validate_common(cfg)
    task = TASKS.get(cfg.task.name)(cfg.task)
    task.validate(sorted({cfg.shots.train, *cfg.shots.eval}))
    model = MODELS.get(cfg.model.name)(cfg.model, task.input_shape, task.output_dim)
    peft = PEFT_METHODS.get(cfg.peft.name)(cfg.peft, model)
    experiment = Experiment(cfg, task, model, peft, learner=None)  # type: ignore[arg-type]
    experiment.learner = ALGORITHMS.get(cfg.algorithm.name)(cfg.algorithm, experiment.loss)
    return experiment


def count(tree: dict) -> int:
    return sum(v.size for _, v in tree_flatten(tree))


def identity(cfg: DictConfig, overrides: Sequence[str]) -> dict:
    return {**{g: cfg[g].name for g in GROUPS}, "seed": cfg.seed, "overrides": list(overrides)}


def memory_mb() -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mlx_mb": mx.get_peak_memory() / 2**20,
            "max_rss_mb": rss / 2**20 if sys.platform == "darwin" else rss / 2**10}


def evaluate_shots(exp: Experiment, meta: dict, scratch: dict, frozen: dict) -> dict:
    """Adapt the meta-learned and the scratch initialization on the same test episodes, for every K."""
    cfg, learner = exp.cfg, exp.learner
    steps, curve_steps, chunk = cfg.evaluation.num_inner_steps, cfg.evaluation.curve_steps, cfg.evaluation.chunk_size
    metric = lambda w, x, y: exp.metric(w, frozen, x, y)
    meta_step = lambda w, x, y: learner.inner_step(meta, w, frozen, x, y)
    sgd = lambda w, x, y: sgd_step(w, mx.grad(exp.loss)(w, frozen, x, y), cfg.algorithm.inner_lr)
    results = {}
    for k in cfg.shots.eval:
        # The same episodes for every algorithm, PEFT method and baseline of this seed.
        episodes = exp.task.sample("test", cfg.mode.num_eval_tasks, k, np.random.default_rng([cfg.seed, 2, k]))
        results[str(k)] = {
            "meta_learned": summarize(
                adaptation_curves(meta["weights"], meta_step, metric, episodes, curve_steps, chunk), steps),
            "scratch": summarize(adaptation_curves(scratch, sgd, metric, episodes, curve_steps, chunk), steps),
        }
    return {"metric": exp.task.metric_name, "higher_is_better": exp.task.higher_is_better,
            "num_inner_steps": steps, "curve_steps": curve_steps, "num_tasks": cfg.mode.num_eval_tasks, "baseline": "scratch", "shots": results}


def run(cfg: DictConfig, out_dir: Path, overrides: Sequence[str] = ()) -> dict:
    """Run one experiment into ``out_dir``. Writes ``metrics.json`` whatever happens, then re-raises failures."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict = {"status": "running", "identity": identity(cfg, overrides)}
    log = TrainLog()
    started = time.perf_counter()
    try:
        exp = build(cfg)
        metrics.update(train_and_evaluate(exp, out_dir, log))
        metrics["status"] = "completed"
        return metrics
    except DivergedError as error:
        metrics.update(status="diverged", reason=str(error), diverged_at_iteration=error.iteration)
        raise
    except BaseException as error:
        metrics.update(status="failed", reason=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        if isinstance(error, ConfigError):
            metrics["config_key"] = error.key
        raise
    finally:
        metrics["total_seconds"] = time.perf_counter() - started
        if log.rows:
            io.write_csv(out_dir / "history.csv", pd.DataFrame(log.rows))
        io.write_json(out_dir / "metrics.json", metrics)


def train_and_evaluate(exp: Experiment, out_dir: Path, log: TrainLog) -> dict:
    cfg, learner, task = exp.cfg, exp.learner, exp.task
    mx.random.seed(cfg.seed)
    mx.reset_peak_memory()
    k_backbone, k_peft, k_scratch = mx.random.split(mx.random.key(cfg.seed), 3)
    adapted, frozen = exp.peft.split(exp.model.init(k_backbone), k_peft)
    scratch, _ = exp.peft.split(exp.model.init(k_scratch), k_scratch)
    meta = learner.meta_parameters(adapted)

    train_rng = np.random.default_rng([cfg.seed, 0])
    val_episodes = task.sample("val", cfg.mode.num_val_tasks, cfg.shots.train, np.random.default_rng([cfg.seed, 1]))

    def validate(meta: dict) -> float:
        step = lambda w, x, y: learner.inner_step(meta, w, frozen, x, y)
        metric = lambda w, x, y: exp.metric(w, frozen, x, y)
        curves = adaptation_curves(meta["weights"], step, metric, val_episodes, cfg.algorithm.num_inner_steps,
                                   cfg.evaluation.chunk_size)
        return float(curves[:, -1].mean())

    meta = meta_train(
        learner, meta, frozen,
        sample_batch=lambda: task.sample("train", cfg.algorithm.meta_batch_size, cfg.shots.train, train_rng),
        num_iterations=cfg.mode.num_iterations, validate=validate, val_interval=cfg.mode.val_interval,
        log=log, progress=cfg.progress,
    )
    train_seconds = log.step_seconds
    save_checkpoint(out_dir / "checkpoint", meta, frozen, cfg)
    evaluation = evaluate_shots(exp, meta, scratch, frozen)
    return {
        "evaluation": evaluation,
        "train": {
            "iterations": log.iterations,
            "seconds_per_iteration": train_seconds / log.iterations,
            "train_seconds": train_seconds,
            "final_loss": log.rows[-1]["loss"],
            "final_val_metric": log.rows[-1]["val_metric"],
        },
        "parameters": {"total": count(adapted) + count(frozen), "adapted": count(adapted),
                       "frozen": count(frozen), "meta_learned": count(meta)},
        "memory": memory_mb(),
    }


def save_checkpoint(directory: Path, meta: dict, frozen: dict, cfg: DictConfig) -> None:
    io.write_text(directory / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    io.save_tree(directory / "meta.safetensors", meta)
    if frozen:
        io.save_tree(directory / "frozen.safetensors", frozen)
