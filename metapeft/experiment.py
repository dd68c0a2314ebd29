"""One run: build from the config, meta-train, evaluate against the scratch baseline, write the run directory.

Data flows one way: config -> task family, backbone, PEFT split (adapted tree, frozen tree) -> algorithm
meta-training -> evaluation -> files (``metrics.json``, ``history.csv``, ``checkpoint/``).
"""
from __future__ import annotations

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
from omegaconf import DictConfig

from metapeft import affinity, blas, io
from metapeft.algorithms.base import MetaLearner, sgd_step
from metapeft.checkpoint import evaluation_config, load_checkpoint, save_checkpoint
from metapeft.config import GROUPS, register_configs, validate_common
from metapeft.errors import ConfigError, DivergedError
from metapeft.evaluate import adaptation_curves, summarize
from metapeft.peft.base import PeftMethod
from metapeft.pretrain import pretrained_backbone
from metapeft.registry import ALGORITHMS, MODELS, PEFT_METHODS, TASKS
from metapeft.tasks.base import TaskFamily
from metapeft.train import TrainLog, meta_train
from metapeft.trees import count, nbytes


@dataclass
class Experiment:
    cfg: DictConfig
    task: TaskFamily
    model: Any
    peft: PeftMethod
    learner: MetaLearner

    def loss(self, adapted: dict, frozen: dict, x: mx.array, y: mx.array) -> mx.array:
        return self.task.loss(self.peft(adapted, frozen, x, train=True), y) + self.peft.regularizer(adapted)

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
    peft.check(model.init(mx.random.key(0)))  # target layers and ranks against the real layer shapes
    experiment = Experiment(cfg, task, model, peft, learner=None)  # type: ignore[arg-type]
    experiment.learner = ALGORITHMS.get(cfg.algorithm.name)(cfg.algorithm, experiment.loss)
    return experiment


def identity(cfg: DictConfig, overrides: Sequence[str]) -> dict:
    return {**{g: cfg[g].name for g in GROUPS}, "seed": cfg.seed, "overrides": list(overrides)}


def memory_mb() -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mlx_mb": mx.get_peak_memory() / 2**20,
            "max_rss_mb": rss / 2**20 if sys.platform == "darwin" else rss / 2**10}


def inference_ms_per_sample(exp: Experiment, weights: dict, frozen: dict, x: mx.array, repeats: int = 20) -> float:
    forward = mx.compile(exp.peft.__call__)
    for _ in range(3):  # warm-up, including compilation
        mx.eval(forward(weights, frozen, x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(forward(weights, frozen, x))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)) / x.shape[0]


def meta_learned_curves(exp: Experiment, meta: dict, frozen: dict, episodes, num_steps: int) -> np.ndarray:
    """Query metric of the meta-learned initialization after 0..num_steps of the algorithm's own inner steps."""
    return adaptation_curves(meta["weights"], lambda w, x, y: exp.learner.inner_step(meta, w, frozen, x, y),
                             lambda w, x, y: exp.metric(w, frozen, x, y), episodes, num_steps,
                             exp.cfg.evaluation.chunk_size)


def scratch_curves(exp: Experiment, scratch: dict, frozen: dict, episodes, num_steps: int) -> np.ndarray:
    """Query metric of the plain initialization after 0..num_steps SGD steps at the algorithm's inner rate."""
    sgd = lambda w, x, y: sgd_step(w, mx.grad(exp.loss)(w, frozen, x, y), exp.cfg.algorithm.inner_lr)
    return adaptation_curves(scratch, sgd, lambda w, x, y: exp.metric(w, frozen, x, y), episodes, num_steps,
                             exp.cfg.evaluation.chunk_size)


def evaluate_shots(exp: Experiment, meta: dict, scratch: dict, frozen: dict) -> dict:
    """Adapt the meta-learned and the scratch initialization on the same test episodes, for every K."""
    cfg = exp.cfg
    steps, curve_steps = cfg.evaluation.num_inner_steps, cfg.evaluation.curve_steps
    results = {}
    for k in cfg.shots.eval:
        # The same episodes for every algorithm, PEFT method and baseline of this seed.
        episodes = exp.task.sample("test", cfg.mode.num_eval_tasks, k, np.random.default_rng([cfg.seed, 2, k]))
        results[str(k)] = {
            "meta_learned": summarize(meta_learned_curves(exp, meta, frozen, episodes, curve_steps), steps),
            "scratch": summarize(scratch_curves(exp, scratch, frozen, episodes, curve_steps), steps),
        }
    return {"metric": exp.task.metric_name, "higher_is_better": exp.task.higher_is_better,
            "num_inner_steps": steps, "curve_steps": curve_steps, "num_tasks": cfg.mode.num_eval_tasks,
            "baseline": "scratch", "shots": results}


def run(cfg: DictConfig, out_dir: Path, overrides: Sequence[str] = ()) -> dict:
    """Run one experiment into ``out_dir``. Writes ``metrics.json`` whatever happens, then re-raises failures.

    With ``train=false`` the saved run's own config is evaluated, with ``overrides`` (the command line) on top."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict = {"status": "running", "identity": identity(cfg, overrides)}
    log = TrainLog()
    started = time.perf_counter()
    try:
        if not cfg.train and cfg.checkpoint is not None:
            cfg = evaluation_config(cfg, overrides)
            metrics["identity"] = identity(cfg, overrides)
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


def initial_state(exp: Experiment) -> tuple:
    """Backbone, frozen tree, adapted tree to meta-learn from, scratch-baseline adapted tree, pretraining facts,
    and sample meta-train inputs (prompt initialization, inference timing)."""
    cfg = exp.cfg
    k_backbone, k_adapted, k_scratch = mx.random.split(mx.random.key(cfg.seed), 3)
    pretraining: dict = {}
    if exp.peft.uses_pretrained_backbone:
        backbone, pretraining = pretrained_backbone(cfg, type(exp.model), exp.task, k_backbone, cfg.progress)
    else:
        backbone = exp.model.init(k_backbone)
    sample_inputs, _ = exp.task.pretraining_batch(np.random.default_rng([cfg.seed, 4]), 256)
    frozen = exp.peft.frozen(backbone)
    adapted = exp.peft.init_adapted(backbone, k_adapted, sample_inputs)
    scratch = exp.peft.init_adapted(backbone, k_scratch, sample_inputs)
    return backbone, frozen, adapted, scratch, pretraining, sample_inputs


def train_and_evaluate(exp: Experiment, out_dir: Path, log: TrainLog) -> dict:
    cfg, learner, task = exp.cfg, exp.learner, exp.task
    mx.random.seed(cfg.seed)
    mx.reset_peak_memory()
    backbone, frozen, adapted, scratch, pretraining, sample_inputs = initial_state(exp)
    meta = learner.meta_parameters(adapted)
    train_rng = np.random.default_rng([cfg.seed, 0])
    val_episodes = task.sample("val", cfg.mode.num_val_tasks, cfg.shots.train, np.random.default_rng([cfg.seed, 1]))

    def validate(meta: dict, frozen: dict) -> float:
        curves = meta_learned_curves(exp, meta, frozen, val_episodes, cfg.algorithm.num_inner_steps)
        return float(curves[:, -1].mean())

    if cfg.train:
        better = None if cfg.keep == "last" else (lambda new, old: new > old if task.higher_is_better else new < old)
        meta, frozen = meta_train(
            learner, meta, frozen,
            sample_batch=lambda: task.sample("train", cfg.algorithm.meta_batch_size, cfg.shots.train, train_rng),
            num_iterations=cfg.mode.num_iterations, validate=validate, val_interval=cfg.mode.val_interval,
            log=log, progress=cfg.progress, after_step=exp.peft.after_meta_step, better=better,
            patience=cfg.patience, keep_from=exp.peft.first_keepable_iteration(cfg.mode.num_iterations),
        )
        save_checkpoint(out_dir / "checkpoint", meta, frozen, cfg)
        train = {
            "iterations": log.iterations,
            "seconds_per_iteration": log.step_seconds / log.iterations,
            "train_seconds": log.step_seconds,
            "final_loss": log.rows[-1]["loss"],
            "final_val_metric": log.rows[-1]["val_metric"],
            "kept": cfg.keep,
            "kept_iteration": log.kept_iteration,  # the saved and evaluated meta-parameters are this iteration's
            "kept_val_metric": log.kept_val_metric,
            "stopped_early": log.stopped_early,  # patience ran out; iterations says when
        }
    else:
        meta, frozen = load_checkpoint(Path(cfg.checkpoint), meta, frozen)
        train = {"iterations": 0, "from_checkpoint": str(cfg.checkpoint), "final_val_metric": validate(meta, frozen)}
    mx.random.seed(cfg.seed)  # evaluation draws the same dropout masks whether trained now or loaded
    evaluation = evaluate_shots(exp, meta, scratch, frozen)
    return {
        "evaluation": evaluation,
        "train": train,
        "parameters": parameter_counts(exp, backbone, adapted, meta),
        "inference_ms_per_sample": inference_ms_per_sample(exp, meta["weights"], frozen, sample_inputs),
        "memory": memory_mb(),
        "blas": blas.status(),
        "cpu_affinity": affinity.status(),
        "peft": exp.peft.report(frozen),
        "pretraining": pretraining,
    }


def parameter_counts(exp: Experiment, backbone: dict, adapted: dict, meta: dict) -> dict:
    """Total = frozen backbone (without its pretraining head) + adapted tree; meta-learned adds e.g. Meta-SGD's rates."""
    backbone_body = count(backbone) - count(backbone["head"]) if exp.peft.uses_pretrained_backbone else 0
    total = backbone_body + count(adapted)
    return {
        "total": total,
        "adapted": count(adapted),
        "meta_learned": count(meta),
        "reduction_ratio": total / count(adapted),
        "adapter_bytes": nbytes(adapted),
        "meta_learned_bytes": nbytes(meta),
    }
