"""What the benchmarks start from: a workload's composed config, experiment and parameters, the peers' description
of it, and how a benchmark starts a part of itself in a process of its own."""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from benchmarks.peers import Spec
from metapeft.backend import mx
from metapeft.build import build
from metapeft.config import CONF_DIR, register_configs

CONF = str(CONF_DIR)
RUNNER = str(Path(__file__).resolve().parents[1] / "runners" / "run.py")  # the runner as users start it
PYTHON = sys.executable


def in_own_process(module: str, *args: str) -> list[str]:
    """The command that runs ``python -m benchmarks.<module> ARGS``: a part of a benchmark in a fresh process (its
    peak memory its own, no other library's threads beside it); each such module documents its arguments."""
    return [PYTHON, "-m", f"benchmarks.{module}", *args]


def compose_workload(overrides: list[str]) -> DictConfig:
    """The config a run with these overrides composes (the compose API, as the tests use it)."""
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return compose(config_name="config", overrides=overrides)


def setup(overrides: list[str]):
    """The workload's experiment, initial meta-parameters and frozen tree (timing does not depend on
    pretrained values, so the backbone is a fresh initialization)."""
    exp = build(compose_workload(overrides))
    key = mx.random.key(0)
    backbone = exp.model.init(key)
    inputs, _ = exp.task.pretraining_batch(np.random.default_rng(0), 64)
    frozen, adapted = exp.peft.frozen(backbone), exp.peft.init_adapted(backbone, key, inputs)
    return exp, exp.learner.meta_parameters(adapted), frozen


def peer_spec(exp):
    cfg = exp.cfg
    spec = Spec(model=cfg.model.name, loss="mse" if cfg.task.name == "sinusoid" else "cross_entropy",
                algorithm=cfg.algorithm.name, inner_lr=cfg.algorithm.inner_lr,
                inner_steps=cfg.algorithm.num_inner_steps, outer_lr=cfg.algorithm.outer_lr,
                outer_lr_final=cfg.algorithm.get("outer_lr_final", 0.0), num_iterations=10**6)
    if cfg.model.name == "transformer":
        spec.num_heads, spec.num_tokens, spec.token_dim = cfg.model.num_heads, exp.model.num_tokens, exp.model.token_dim
    if cfg.model.name == "hf_encoder":
        model = exp.model
        spec.num_heads, spec.pad_id, spec.position_offset = model.num_heads, model.pad_id, model.position_offset
        spec.layer_norm_eps, spec.tasks_per_pass = model.eps, cfg.algorithm.tasks_per_pass
    if cfg.peft.name == "lora":
        spec.lora_scale = cfg.peft.alpha / cfg.peft.rank
    return spec


def our_compiled_step(exp, meta: dict, frozen: dict, batches: list) -> Callable[[int], float]:
    """The runner's own compiled meta-step over ``batches``: ``step(i)`` updates the meta-parameters on batch ``i``
    and returns its meta-loss before the update."""
    from metapeft.train import compiled_meta_step

    optimizer = exp.learner.make_optimizer(10**6)
    optimizer.init(meta)
    step, state = compiled_meta_step(exp.learner, optimizer), {"meta": meta}
    mx.eval(meta, frozen)

    def run_step(i: int) -> float:
        loss, state["meta"], grads = step(state["meta"], frozen, *batches[i])
        mx.eval(loss, state["meta"], grads)
        return loss.item()

    return run_step


def timed_steps(run_step: Callable[[int], float], repeats: int) -> dict:
    """One warm-up step, then ``repeats`` timed: ms per step (the median), the first step's time and its loss (the
    meta-loss on the first batch, before any update), and the process's peak resident memory."""
    times, first_loss = [], None
    for i in range(repeats + 1):
        start = time.perf_counter()
        loss = run_step(i)
        times.append(time.perf_counter() - start)
        first_loss = loss if first_loss is None else first_loss
    return {"first_loss": first_loss, "ms_per_iteration": 1e3 * float(np.median(times[1:])), "first_ms": 1e3 * times[0],
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
