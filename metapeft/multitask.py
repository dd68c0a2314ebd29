"""Block et al.'s "standard retraining" (NeurIPS 2025), the start of the ``multitask_finetune`` baseline: the run's
PEFT method from its plain initialization, trained on the meta-training tasks together rather than meta-learned.

Each step is one Adam update (``algorithm.outer_lr``, the meta-learner's own rate) on the mean loss over the support
and query examples of ``algorithm.meta_batch_size`` meta-training tasks, drawn as meta-training draws them, for
``mode.num_iterations`` steps, the meta-learner's budget. Every ``mode.val_interval`` steps the retrained weights are
scored, unadapted, on the meta-validation tasks meta-training validates on; the best are kept, as meta-training
keeps them (``keep=best_val``; ``keep=last``: the last). The per-task fine-tuning that follows is ``finetune``'s,
tuned on validation (``metapeft.finetune``).
"""
from __future__ import annotations

import numpy as np

from metapeft.backend import mx, optim


def multitask_retrained(exp, start: dict, frozen: dict) -> tuple[dict, dict]:
    """The retrained weights and what was done: steps, rate, the kept step and its validation score."""
    cfg, task = exp.cfg, exp.task
    rng = np.random.default_rng([cfg.seed, 7])
    val = exp.meta_validation_episodes()

    def batch_loss(weights, xs, ys, xq, yq):
        loss = lambda x, y: exp.loss(weights, frozen, x, y)
        return (mx.vmap(loss)(xs, ys).mean() + mx.vmap(loss)(xq, yq).mean()) / 2

    optimizer = optim.Adam(learning_rate=cfg.algorithm.outer_lr)
    optimizer.init(start)
    value_and_grad = mx.value_and_grad(batch_loss)
    score = lambda weights: float(mx.vmap(lambda x, y: exp.metric(weights, frozen, x, y))(val.xq, val.yq).mean())
    better = (lambda new, old: new > old) if task.higher_is_better else (lambda new, old: new < old)
    weights, kept, kept_step, kept_score = start, start, 0, score(start)
    for step in range(1, cfg.mode.num_iterations + 1):
        _, grads = value_and_grad(weights, *task.sample("train", cfg.algorithm.meta_batch_size, cfg.shots.train, rng))
        weights = optimizer.apply_gradients(grads, weights)  # a new tree: the kept one stays as it was
        mx.eval(weights, optimizer.state)
        if step % cfg.mode.val_interval == 0 or step == cfg.mode.num_iterations:
            now = score(weights)
            if better(now, kept_score) or cfg.keep == "last":
                kept, kept_step, kept_score = weights, step, now
    return kept, {"retraining": {"steps": cfg.mode.num_iterations, "learning_rate": cfg.algorithm.outer_lr,
                                 "tasks_per_step": cfg.algorithm.meta_batch_size, "kept_step": kept_step,
                                 "kept_val_metric": kept_score}}
