"""Pretraining of the backbone that PEFT methods adapt, on the meta-train split only, cached on disk.

The cache file is named by a hash of everything that determines the weights (task, model, pretraining settings,
seed). Concurrent jobs asking for the same backbone take a file lock: the first trains and writes it atomically
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

from metapeft import io
from metapeft.backend import mx, optim

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def cache_key(cfg: DictConfig) -> str:
    identity = {
        "version": FORMAT_VERSION,
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "pretrain": {k: v for k, v in OmegaConf.to_container(cfg.pretrain, resolve=True).items() if k != "cache_dir"},
        "seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def pretrained_backbone(cfg: DictConfig, model_class, task, key: mx.array, progress: bool = True) -> tuple[dict, dict]:
    """The backbone's parameters (with a head sized for pretraining) and facts about where they came from."""
    directory = Path(cfg.pretrain.cache_dir).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    name = f"{cfg.task.name}-{cfg.model.name}-{cache_key(cfg)}"
    path = directory / f"{name}.safetensors"
    with open(directory / f"{name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for the pretrained backbone %s, being built by another job", path)
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if path.exists():
            try:
                return io.load_tree(path), {"cache_file": str(path), "cache_hit": True}
            except (OSError, ValueError, RuntimeError) as error:  # truncated or corrupt: a miss, not a failed run
                log.warning("the cached backbone %s cannot be read (%s); pretraining it again", path, error)
        model = model_class(cfg.model, task.input_shape, task.pretraining_outputs)
        params, final_loss = train(model, task, cfg.pretrain, key, cfg.seed, progress)
        io.save_tree(path, params, metadata={"final_loss": str(final_loss)})
        log.info("pretrained %s on %s meta-train data (final loss %.4f) -> %s", cfg.model.name, cfg.task.name,
                 final_loss, path)
        # return what a later job will load, so a cache hit and a miss give the very same tree
        return io.load_tree(path), {"cache_file": str(path), "cache_hit": False, "final_loss": final_loss}


def train(model, task, cfg, key: mx.array, seed: int, progress: bool) -> tuple[dict, float]:
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
    for _ in tqdm(range(cfg.iterations), desc="pretrain backbone", disable=not progress, mininterval=1.0):
        loss, params = step(params, *task.pretraining_batch(rng, cfg.batch_size))
        mx.eval(loss, params)
    return params, loss.item()
