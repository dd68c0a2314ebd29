"""Few-shot evaluation: adaptation curves over evaluation tasks, summarized as mean and 95% CI, for the
meta-learned initialization and every baseline (``metapeft.baselines``), on the very same episodes."""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
from tqdm import tqdm

from metapeft import distributed
from metapeft.backend import mx
from metapeft.build import Experiment
from metapeft.errors import stop_requested
from metapeft.finetune import tuned_finetune
from metapeft.measure import PhaseTimes
from metapeft.stats import ci95_method, class_count, class_set_count, mean_ci95
from metapeft.tasks.base import Episodes, TaskClasses

logger = logging.getLogger(__name__)
StartFn = Callable[["mx.array", "mx.array"], dict]  # (x_support, y_support) -> weights adaptation starts from
StepFn = Callable[[dict, "mx.array", "mx.array"], dict]  # (weights, x_support, y_support) -> weights
MetricFn = Callable[[dict, "mx.array", "mx.array"], "mx.array"]  # (weights, x_query, y_query) -> scalar


def curves_over_tasks(start: StartFn, step: StepFn, metric: MetricFn, num_steps: int) -> Callable:
    """``(xs, ys, xq, yq) -> (tasks, num_steps + 1)``: the query metric after 0, 1, ..., num_steps inner steps from
    ``start(support)``, vectorized over tasks."""

    def one_task(xs, ys, xq, yq):
        weights = start(xs, ys)
        scores = [metric(weights, xq, yq)]
        for _ in range(num_steps):
            weights = step(weights, xs, ys)
            scores.append(metric(weights, xq, yq))
        return mx.stack(scores)

    return mx.vmap(one_task)


def adaptation_curves(start: StartFn, step: StepFn, metric: MetricFn, episodes: Episodes, num_steps: int,
                      chunk_size: int) -> np.ndarray:
    """Query metric after 0, 1, ..., num_steps inner steps from ``start(support)``: an array (tasks, num_steps + 1),
    computed ``chunk_size`` tasks at a time (bounds memory; under ``mlx.launch`` the chunks are shared out)."""
    per_task = curves_over_tasks(start, step, metric, num_steps)

    def chunk(lo: int, hi: int) -> np.ndarray:
        curves = per_task(*(a[lo:hi] for a in episodes))
        mx.eval(curves)
        return np.array(curves)

    return distributed.gather_rows(chunk, len(episodes), chunk_size)  # under mlx.launch: chunks split by process


def summarize_values(per_task: np.ndarray, classes: np.ndarray | None = None) -> dict:
    """One figure per task: mean and 95% CI over tasks drawn from ``classes`` (see ``metapeft.stats``)."""
    mean, ci = mean_ci95(per_task, classes)
    return {"mean": mean, "ci95": ci, "num_tasks": int(per_task.size), "per_task": [float(v) for v in per_task]}


def summarize(curves: np.ndarray, report_step: int, classes: np.ndarray | None = None) -> dict:
    """The metric after ``report_step`` inner steps and the whole curve, each as mean and 95% CI over tasks
    drawn from ``classes``."""
    final_mean, final_ci = mean_ci95(curves[:, report_step], classes)
    per_step = [mean_ci95(curves[:, s], classes) for s in range(curves.shape[1])]
    return {
        "mean": final_mean,
        "ci95": final_ci,
        "num_tasks": int(curves.shape[0]),
        "inner_steps": report_step,
        "curve_mean": [m for m, _ in per_step],
        "curve_ci95": [c for _, c in per_step],
        "per_task": [float(v) for v in curves[:, report_step]],  # lets aggregation pool tasks over seeds exactly
    }


def learner_curves(exp: Experiment, meta: dict, frozen: dict, episodes: Episodes, num_steps: int) -> np.ndarray:
    """Query metric after 0..num_steps of the algorithm's own inner steps from the meta-parameters ``meta``."""
    frozen = exp.learner.task_frozen(meta, frozen)  # the meta-learned backbone, under meta_learn=backbone|both
    return adaptation_curves(lambda x, y: exp.learner.task_start(meta, frozen, x, y),
                             lambda w, x, y: exp.learner.inner_step(meta, w, frozen, x, y),
                             lambda w, x, y: exp.metric(w, frozen, x, y), episodes, num_steps,
                             exp.cfg.evaluation.chunk_size)


def plain_init_curves(exp: Experiment, plain: dict, frozen: dict, episodes: Episodes, num_steps: int) -> np.ndarray:
    """The baseline: the same model and method from its plain (not meta-learned) initialization, adapted by the
    algorithm's own update rule with nothing meta-learned in it (Meta-SGD: every rate at its initial value)."""
    return learner_curves(exp, exp.learner.meta_parameters(plain), frozen, episodes, num_steps)


def meta_learned_finetuned(exp: Experiment, meta: dict, frozen: dict, episodes: Episodes) -> tuple[np.ndarray, dict]:
    """The meta-learned start (and backbone) fine-tuned with Adam on each support set, as the ``finetune``
    baseline is, its learning rate and step count chosen on meta-validation tasks."""
    frozen = exp.learner.task_frozen(meta, frozen)
    return tuned_finetune(exp, lambda w, x, y: exp.loss(w, frozen, x, y), lambda w, x, y: exp.metric(w, frozen, x, y),
                          lambda x, y: exp.learner.task_start(meta, frozen, x, y), episodes)


def versus(ours: np.ndarray, theirs: np.ndarray, higher_is_better: bool, classes: np.ndarray | None = None) -> dict:
    """The paired difference, task by task, oriented so that positive means ours is better; mean and 95% CI."""
    difference = (ours - theirs) if higher_is_better else (theirs - ours)
    mean, ci = mean_ci95(difference, classes)
    return {"difference": mean, "ci95": ci, "better": bool(mean - ci > 0), "worse": bool(mean + ci < 0)}


def task_structure(drawn: TaskClasses | None) -> dict:
    """What the confidence intervals had to respect: how many classes, class sets and sources the tasks came
    from, and each task's sources, which let aggregation pool seeds with the same interval."""
    if drawn is None:
        return {"ci95_method": ci95_method(None)}
    return {"ci95_method": ci95_method(drawn.sources), "num_classes": class_count(drawn.classes),
            "num_distinct_class_sets": class_set_count(drawn.classes), "num_sources": class_count(drawn.sources),
            "task_sources": drawn.sources.tolist()}


def sources_of(drawn: TaskClasses | None) -> np.ndarray | None:
    return None if drawn is None else drawn.sources


# episodes -> per-task metric (tasks,) or curves (tasks, steps + 1), or either with a dict of facts to record
BaselineFn = Callable[[Episodes], "np.ndarray | tuple[np.ndarray, dict]"]


def evaluate_shots(exp: Experiment, meta: dict, frozen: dict, baselines: dict[str, BaselineFn],
                   seconds_by_shot: dict | None = None) -> dict:
    """The meta-learned initialization and every baseline on the same test episodes, for every K, with the
    paired difference to the best baseline (by mean) at each K. ``seconds_by_shot`` (K -> name -> seconds) gets
    what each cost, kept apart from the figures so that two runs' evaluations compare equal."""
    cfg, higher = exp.cfg, exp.task.higher_is_better
    steps, curve_steps = cfg.evaluation.num_inner_steps, cfg.evaluation.curve_steps
    results = {}
    for k in tqdm(cfg.shots.eval, desc="evaluate (K)", disable=not cfg.progress):
        stop_requested()
        # The same episodes for every algorithm, PEFT method and baseline of this seed.
        episodes, drawn = exp.task.sample_with_classes("test", cfg.mode.num_eval_tasks, k,
                                                       np.random.default_rng([cfg.seed, 2, k]))
        classes = sources_of(drawn)
        seconds = PhaseTimes()  # what each costs (a shared computation, e.g. features, is paid by its first user)
        with seconds.phase("meta_learned"):
            ours = summarize(learner_curves(exp, meta, frozen, episodes, curve_steps), steps, classes)
        if cfg.evaluation.finetune_meta_learned:  # ours as a practitioner would use it: fine-tuned, tuned on val
            results_finetuned = seconds.timed("meta_learned_finetuned", meta_learned_finetuned)(exp, meta, frozen,
                                                                                                 episodes)
        scored = {name: seconds.timed(name, fn)(episodes) for name, fn in baselines.items()}
        details = {name: v[1] for name, v in scored.items() if isinstance(v, tuple)}  # e.g. what was tuned
        scored = {name: np.asarray(v[0] if isinstance(v, tuple) else v) for name, v in scored.items()}
        theirs = {name: {**(summarize(v, steps, classes) if v.ndim == 2 else summarize_values(v, classes)),
                         **details.get(name, {})} for name, v in scored.items()}
        results[str(k)] = {"meta_learned": ours, "baselines": theirs, **task_structure(drawn)}
        if seconds_by_shot is not None:
            seconds_by_shot[str(k)] = {name: round(s, 3) for name, s in seconds.seconds.items()}
        if cfg.evaluation.finetune_meta_learned:
            values, facts = results_finetuned
            results[str(k)]["meta_learned_finetuned"] = {**summarize_values(values, classes), **facts}
        logger.info("evaluation at K=%d took %s", k, ", ".join(f"{name} {s:.1f} s" for name, s in
                                                           sorted(seconds.seconds.items(), key=lambda i: -i[1])))
        if theirs:
            best = (max if higher else min)(theirs, key=lambda name: theirs[name]["mean"])
            results[str(k)]["versus_best_baseline"] = {"baseline": best, **versus(
                np.array(ours["per_task"]), np.array(theirs[best]["per_task"]), higher, classes)}
    return {"metric": exp.task.metric_name, "higher_is_better": higher, "num_inner_steps": steps,
            "curve_steps": curve_steps, "num_tasks": cfg.mode.num_eval_tasks, "shots": results}
