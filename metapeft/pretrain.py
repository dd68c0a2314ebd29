"""Pretraining of the backbone that PEFT methods adapt, on the meta-train split only, cached on disk.

Trained until its features stop improving on meta-validation tasks (early stopping), not for a fixed count: every
``pretrain.val_interval`` iterations the backbone's features are scored few-shot on ``pretrain.num_val_tasks``
meta-validation tasks (nearest class mean for classification, a ridge head refit for regression, as the feature
baselines use them); training stops after ``pretrain.patience`` validations without improvement, or at
``pretrain.iterations``, and the best validated weights are kept. How long it ran and why it stopped are recorded
with the weights (and so in every run's ``metrics.json`` under ``pretraining``).

The cache file is named by a hash of everything that determines the weights: task, model, pretraining settings
(``pretrain.seed`` among them: by default the run's seed, so that runs over several seeds include the variance of
pretraining), and the numerics that change float results (the BLAS and its thread count: OpenBLAS splits a matrix
product's sums differently over 1 and 2 threads, and early stopping can then end thousands of iterations apart).
Concurrent jobs asking for the same backbone take a file lock: the first trains and writes it atomically
(temporary file, then rename); the others wait and load it. A cache file that cannot be read (damaged outside
metapeft) is built again, as on a miss. Location: ``pretrain.cache_dir`` (default
``$METAPEFT_CACHE_DIR`` or ``~/.cache/metapeft``).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from metapeft import blas, io
from metapeft.backend import mx, optim
from metapeft.probes import flat, nearest_centroid, ridge_mse

log = logging.getLogger(__name__)
FORMAT_VERSION = 3  # 2: early stopping on meta-validation; 3: pretrain.seed, the numerics in the key


def numerics() -> dict:
    """What, besides the settings, changes a backbone's float results on this machine: the BLAS behind MLX's CPU
    matrix products and its thread count."""
    status = blas.status()
    return {"blas": status.get("backend"), "blas_threads": status.get("threads")}


def cache_key(cfg: DictConfig, machine: dict) -> str:
    identity = {
        "version": FORMAT_VERSION,
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "pretrain": {k: v for k, v in OmegaConf.to_container(cfg.pretrain, resolve=True).items() if k != "cache_dir"},
        "numerics": machine,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def pretrained_backbone(cfg: DictConfig, model_class, task, key: mx.array, progress: bool = True) -> tuple[dict, dict]:
    """The backbone's parameters (with a head sized for pretraining) and facts about where they came from."""
    directory = Path(cfg.pretrain.cache_dir).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    name = f"{cfg.task.name}-{cfg.model.name}-{cache_key(cfg, numerics())}"
    path = directory / f"{name}.safetensors"
    with open(directory / f"{name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for the pretrained backbone %s, being built by another job", path)
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if path.exists():
            try:
                params, facts = io.load_tree_with_metadata(path)
                return params, {"cache_file": str(path), "cache_hit": True, "seed": cfg.pretrain.seed, **numerics(),
                                **json.loads(facts.get("facts", "{}"))}
            except (OSError, ValueError, RuntimeError) as error:  # truncated or corrupt: a miss, not a failed run
                log.warning("the cached backbone %s cannot be read (%s); pretraining it again", path, error)
        model = model_class(cfg.model, task.input_shape, task.pretraining_outputs)
        params, facts = train(model, task, cfg.pretrain, key, cfg.pretrain.seed, progress)
        io.save_tree(path, params, metadata={"facts": json.dumps(facts)})
        log.info("pretrained %s on %s meta-train data: %d iterations, best validation %s %.4f at iteration %d (%s)"
                 " -> %s", cfg.model.name, cfg.task.name, facts["iterations"], task.metric_name,
                 facts["best_val_metric"], facts["best_iteration"], facts["stopped"], path)
        # return what a later job will load, so a cache hit and a miss give the very same tree
        return io.load_tree(path), {"cache_file": str(path), "cache_hit": False, "seed": cfg.pretrain.seed,
                                    **numerics(), **facts}


def feature_score(model, task, params: dict, episodes) -> float:
    """How well the backbone's features (head removed) serve few-shot tasks: the mean query accuracy of the nearest
    support class mean (classification) or the mean query MSE of a ridge head (alpha=1) refit on the support set
    (regression)."""
    embed = mx.vmap(lambda x: model.features(params, x))
    support, query = (flat(embed(x)) for x in (episodes.xs, episodes.xq))
    if task.num_classes is not None:
        return float(nearest_centroid(support, episodes.ys, query, episodes.yq, task.num_classes).mean())
    return float(ridge_mse(support, episodes.ys, query, episodes.yq).mean())


def train(model, task, cfg, key: mx.array, seed: int, progress: bool) -> tuple[dict, dict]:
    """Adam on the pretraining objective, validated every ``cfg.val_interval`` iterations; returns the best
    validated weights and what happened (iterations run, the best iteration and its score, why it stopped)."""
    params = model.init(key)
    optimizer = optim.Adam(learning_rate=cfg.lr)
    optimizer.init(params)
    loss_and_grad = mx.value_and_grad(lambda p, x, y: task.loss(model(p, x), y))
    state = [optimizer.state]

    def step(params, x, y):
        loss, grads = loss_and_grad(params, x, y)
        return loss, optimizer.apply_gradients(grads, params)

    step = mx.compile(step, inputs=state, outputs=state)
    rng = np.random.default_rng([seed, 3])
    val_episodes = task.sample("val", cfg.num_val_tasks, cfg.val_shots, np.random.default_rng([seed, 5]))
    better = (lambda new, old: new > old) if task.higher_is_better else (lambda new, old: new < old)
    best, best_score, best_iteration, since_best, history = params, None, 0, 0, []
    stopped = f"reached pretrain.iterations={cfg.iterations}"
    bar = tqdm(range(1, cfg.iterations + 1), desc="pretrain backbone", disable=not progress, mininterval=1.0)
    for iteration in bar:
        loss, params = step(params, *task.pretraining_batch(rng, cfg.batch_size))
        mx.eval(loss, params)
        if iteration % cfg.val_interval and iteration != cfg.iterations:
            continue
        score = feature_score(model, task, params, val_episodes)
        history.append({"iteration": iteration, "loss": loss.item(), "val_metric": score})
        bar.set_postfix(loss=f"{loss.item():.4f}", val=f"{score:.4f}")
        if best_score is None or better(score, best_score):
            best, best_score, best_iteration, since_best = params, score, iteration, 0
        else:
            since_best += 1
            if since_best >= cfg.patience:
                stopped = f"no better validation in {cfg.patience} validations (pretrain.patience)"
                break
    return best, {"iterations": iteration, "best_iteration": best_iteration, "best_val_metric": best_score,
                  "val_metric": f"{task.metric_name} of {'nearest class means' if task.num_classes else 'a ridge head'}"
                  f" on {cfg.num_val_tasks} meta-validation tasks, {cfg.val_shots}-shot",
                  "stopped": stopped, "final_loss": loss.item(), "history": history}
