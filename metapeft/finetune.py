"""The practitioner's baseline: fine-tune on the support set alone, with Adam, as long as validation says.

Someone with a pretrained model and K examples per class puts a fresh head on it, trains the run's PEFT method from
its plain initialization (or, without PEFT, the whole network, or the head alone) on those examples, and stops
when more steps stop helping. Here the learning rate and the step count are chosen from a grid
(``finetune.learning_rates`` x ``mode.finetune_steps``) on meta-validation tasks with the same K, never on the
test tasks; the chosen pair then scores the test episodes. Every task is fine-tuned independently, vectorized over
tasks with ``vmap`` and ``evaluation.chunk_size`` tasks at a time, as the adaptation curves are.

Adam is the textbook update with bias correction (Kingma & Ba, 2015; PyTorch's defaults: beta1 0.9, beta2 0.999,
eps 1e-8), written over trees so that it vectorizes over tasks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List

import numpy as np
from tqdm import tqdm

from metapeft.backend import mx, utils
from metapeft.tasks.base import Episodes

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


@dataclass
class FinetuneConfig:
    """The ``finetune`` baselines' search grid (the step counts are ``mode.finetune_steps``); by default the
    mode's budget."""

    learning_rates: List[float] = "${mode.finetune_learning_rates}"  # type: ignore[assignment]


def adam_step(weights: dict, m: dict, v: dict, grads: dict, step: mx.array, lr: float) -> tuple[dict, dict, dict]:
    """One Adam update (``step`` counts from 1)."""
    m = utils.tree_map(lambda a, g: BETA1 * a + (1 - BETA1) * g, m, grads)
    v = utils.tree_map(lambda a, g: BETA2 * a + (1 - BETA2) * mx.square(g), v, grads)
    c1, c2 = 1 - BETA1 ** step, 1 - BETA2 ** step
    weights = utils.tree_map(lambda w, a, b: w - lr * (a / c1) / (mx.sqrt(b / c2) + EPS), weights, m, v)
    return weights, m, v


LossFn = Callable[[dict, "mx.array", "mx.array"], "mx.array"]  # (trainable, x, y) -> support loss
MetricFn = Callable[[dict, "mx.array", "mx.array"], "mx.array"]  # (trainable, x, y) -> query metric


Start = "dict | Callable[[mx.array, mx.array], dict]"  # the weights every task starts from, or (xs, ys) -> them


def task_stepper(loss: LossFn) -> Callable:
    """One Adam step on every task's support loss, vectorized over tasks and compiled once for all learning rates:
    ``(weights, m, v, xs, ys, step, lr) -> (weights, m, v)``, tasks on the leading axis."""
    grad = mx.grad(loss)

    def one_step(weights, m, v, xs, ys, step, lr):
        return adam_step(weights, m, v, grad(weights, xs, ys), step, lr)

    return mx.compile(mx.vmap(one_step, in_axes=(0, 0, 0, 0, 0, None, None)))


def finetune_scores(step_tasks: Callable, metric: MetricFn, start: Start, episodes: Episodes, lr: float,
                    checkpoints: list[int], chunk_size: int) -> np.ndarray:
    """(tasks, len(checkpoints)): the query metric after each count of Adam steps (``task_stepper``) in
    ``checkpoints`` on every task's support set, from ``start`` (the same tree for every task, or a function of the
    task's support set)."""
    score_tasks = mx.vmap(metric)
    chunks = []
    for lo in range(0, len(episodes), chunk_size):
        xs, ys, xq, yq = (a[lo: lo + chunk_size] for a in episodes)
        weights = mx.vmap(start)(xs, ys) if callable(start) else \
            utils.tree_map(lambda w: mx.broadcast_to(w, (xs.shape[0], *w.shape)), start)
        m = utils.tree_map(mx.zeros_like, weights)
        v = utils.tree_map(mx.zeros_like, weights)
        scores = []
        for step in range(1, max(checkpoints) + 1):
            weights, m, v = step_tasks(weights, m, v, xs, ys, mx.array(step, dtype=mx.float32), mx.array(lr))
            mx.eval(weights, m, v)
            if step in checkpoints:
                scores.append(np.array(score_tasks(weights, xq, yq)))
        chunks.append(np.stack(scores, axis=1))
    return np.concatenate(chunks)


def choose_on_validation(step_tasks: Callable, metric: MetricFn, start: Start, val_episodes: Episodes,
                         learning_rates: list[float], checkpoints: list[int], chunk_size: int,
                         higher_is_better: bool, progress: bool = False) -> dict:
    """The (learning rate, step count) with the best mean validation metric, and the whole grid. ``progress``: a
    bar over the rates, with the time left (each rate runs every step count at once)."""
    rates = tqdm(learning_rates, desc=f"finetune grid on {len(val_episodes)} validation tasks", disable=not progress,
                 leave=False)
    grid = {lr: finetune_scores(step_tasks, metric, start, val_episodes, lr, checkpoints, chunk_size).mean(axis=0)
            for lr in rates}
    pick = max if higher_is_better else min
    worst = -np.inf if higher_is_better else np.inf  # a setting that diverged (NaN) is never chosen
    score = lambda c: grid[c[0]][c[1]] if np.isfinite(grid[c[0]][c[1]]) else worst
    lr, index = pick(((lr, i) for lr in grid for i in range(len(checkpoints))), key=score)
    # a choice at the grid's largest step count or at either end of its rates may be cut short by the grid
    at_edge = index == len(checkpoints) - 1 or (len(grid) > 1 and lr in (min(grid), max(grid)))
    return {"learning_rate": lr, "steps": checkpoints[index], "val_metric": float(grid[lr][index]),
            "at_grid_edge": bool(at_edge),
            "val_grid": {f"{lr:g}": dict(zip(map(str, checkpoints), map(float, grid[lr]))) for lr in grid},
            "num_val_tasks": len(val_episodes)}


def validation_episodes(exp, shots: int) -> Episodes:
    """The ``mode.baseline_val_tasks`` meta-validation tasks of K = ``shots`` that every tuned baseline chooses
    its settings on (the same tasks for all of them)."""
    return exp.task.sample("val", exp.cfg.mode.baseline_val_tasks, shots,
                           np.random.default_rng([exp.cfg.seed, 6, shots]))


def shots_of(exp, episodes: Episodes) -> int:
    return episodes.xs.shape[1] // (exp.task.num_classes or 1)


def tuned_finetune(exp, loss: LossFn, metric: MetricFn, start: Start, episodes: Episodes,
                   inputs: Callable[[Episodes], Episodes] | None = None) -> tuple[np.ndarray, dict]:
    """Per-task test metric of fine-tuning from ``start`` with the (learning rate, steps) chosen on
    ``mode.baseline_val_tasks`` meta-validation tasks of the test episodes' K, and that choice. ``inputs`` turns the
    validation and test episodes into what ``loss`` and ``metric`` read (e.g. a fixed body's features, computed
    once instead of at every step)."""
    cfg = exp.cfg
    val = validation_episodes(exp, shots_of(exp, episodes))
    if inputs is not None:
        val, episodes = inputs(val), inputs(episodes)
    step_tasks = task_stepper(loss)
    chosen = choose_on_validation(step_tasks, metric, start, val, list(cfg.finetune.learning_rates),
                                  sorted(cfg.mode.finetune_steps), cfg.evaluation.chunk_size,
                                  exp.task.higher_is_better, progress=cfg.progress)
    test = finetune_scores(step_tasks, metric, start, episodes, chosen["learning_rate"], [chosen["steps"]],
                           cfg.evaluation.chunk_size)
    return test[:, 0], {"chosen_on_validation": chosen}
