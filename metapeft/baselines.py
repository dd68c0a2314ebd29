"""Strong simple baselines, scored on the very episodes the meta-learned model is evaluated on.

Classification (N-way K-shot):
- ``nearest_centroid``: each query goes to the class whose mean raw input is nearest (Euclidean). Raw input:
  the flattened image, or for text a bag of tokens (``TaskFamily.raw_features``).
- ``nearest_neighbour``: each query takes the label of its nearest support example (1-NN, Euclidean) on the raw
  input.
- ``logistic_regression``: scikit-learn's ``LogisticRegression`` (L2) fit on the raw support set, its C chosen on
  meta-validation tasks of the same K from ``probe.logistic_c``.
- ``prototype``: nearest centroid on the features of the pretrained backbone (frozen, its head removed).
- ``linear_probe``: logistic regression on those features, each L2-normalized (as Tian et al., 2020, "a good
  embedding is all you need", do; it also keeps lbfgs from running into its iteration limit on raw features), its C
  chosen on validation as ``logistic_regression``'s.
- ``plain_init``: the run's own model and method from its plain initialization (no meta-learning), adapted by the
  algorithm's own update rule with the evaluation budget.
- ``finetune``: the practitioner's baseline (``metapeft.finetune``): the pretrained backbone with a fresh head and
  the run's PEFT method at its plain initialization (``peft=none``: the whole pretrained network), trained with
  Adam on the support set alone, the learning rate and step count chosen on meta-validation tasks.
- ``finetune_head`` (``peft=none``): the same with the head alone.

Regression:
- ``zero``: predict 0. ``support_mean``: predict the mean support target.
- ``linear_probe``: the multi-task pretrained backbone with its head refit on the support set (ridge, alpha chosen
  on validation from ``probe.ridge_alpha``).
- ``plain_init``, ``finetune``, ``finetune_head``: as above.
- ``oracle`` (a task family that knows the right backbone, ``task=low_rank``): ``finetune`` over that backbone.

Text-to-text (``task=text_tasks``, a language model), scored as the task scores (option accuracy, exact match):
- ``zero_shot``: the pretrained language model on the query's prompt alone.
- ``in_context``: the pretrained language model with the K support examples as demonstrations before each query
  (the practitioner's first choice; the last demonstrations that fit the model's context, their mean count recorded).
- ``plain_init``, ``finetune``: as above (``finetune``: the run's PEFT method from its plain start, tuned on
  validation).
- ``multitask_finetune``: Block et al.'s "standard retraining": the run's PEFT method trained on the meta-training
  tasks together (``metapeft.multitask``), then fine-tuned on each support set as ``finetune`` is.

The pretrained backbone is the one the PEFT methods adapt (``metapeft.pretrain``: trained on the meta-train split
only); for ``peft=none`` it is pretrained (and cached) for these baselines alone. No baseline is tuned on the test
split: the linear read-outs' regularisation and the fine-tuning baselines' two settings are chosen on the
``mode.baseline_val_tasks`` meta-validation tasks of the test episodes' K (the same tasks for all of them), and each
choice is recorded in metrics.json (``chosen_on_validation``, with ``at_grid_edge`` where the grid may have cut it
short); lbfgs runs to ``max_iter=1000``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from metapeft.backend import mx
from metapeft.build import Experiment
from metapeft.errors import require
from metapeft.evaluate import BaselineFn, plain_init_curves
from metapeft.finetune import shots_of, tuned_finetune, validation_episodes
from metapeft.multitask import multitask_retrained
from metapeft.peft.targets import without_head
from metapeft.probes import flat, logistic_regression, nearest_centroid, ridge_mse, tuned
from metapeft.tasks.base import Episodes
from metapeft.trees import merge

CLASSIFICATION = ("nearest_centroid", "nearest_neighbour", "logistic_regression", "prototype", "linear_probe",
                  "plain_init", "finetune", "finetune_head")
REGRESSION = ("zero", "support_mean", "linear_probe", "plain_init", "finetune", "finetune_head")
TEXT_TO_TEXT = ("zero_shot", "in_context", "plain_init", "finetune", "multitask_finetune")
NEEDS_PRETRAINED = ("prototype", "linear_probe", "finetune", "finetune_head", "zero_shot", "in_context")


def applicable(exp: Experiment) -> tuple[str, ...]:
    if getattr(exp.task, "generative", False):
        return TEXT_TO_TEXT
    names = CLASSIFICATION if exp.task.num_classes is not None else REGRESSION
    if exp.peft.uses_pretrained_backbone:  # the head alone over a PEFT run's backbone is the linear probe's job
        names = tuple(name for name in names if name != "finetune_head")
        if hasattr(exp.task, "oracle_backbone"):
            names = (*names, "oracle")
    return names


def chosen(exp: Experiment) -> tuple[str, ...]:
    """The ``baselines`` key (null: every one that applies but those the mode skips for their cost,
    ``mode.skipped_baselines``), checked before any work."""
    valid, known = applicable(exp), (*CLASSIFICATION, *REGRESSION, *TEXT_TO_TEXT, "oracle")
    for name in exp.cfg.mode.skipped_baselines:
        require(name in known, "mode.skipped_baselines", f"'{name}' is no baseline; valid: {sorted(set(known))}")
    if exp.cfg.baselines is None:
        return tuple(name for name in valid if name not in exp.cfg.mode.skipped_baselines)
    for name in exp.cfg.baselines:
        require(name in valid, "baselines", f"'{name}' does not apply to task={exp.cfg.task.name}; valid: "
                f"{list(valid)} (or null for all of them)")
    return tuple(dict.fromkeys(exp.cfg.baselines))


def nearest_neighbour(xs, ys, xq, yq) -> np.ndarray:
    """Accuracy per task of giving each query the label of its nearest support example (1-NN)."""
    distances = ((xq[:, :, None, :] - xs[:, None, :, :]) ** 2).sum(axis=-1)  # (tasks, query, support)
    nearest = distances.argmin(axis=-1)
    return (np.take_along_axis(np.asarray(ys), nearest, axis=1) == np.asarray(yq)).mean(axis=1)


def l2_normalized(features: np.ndarray) -> np.ndarray:
    return features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)


def last_episodes(compute: Callable[[Episodes], tuple]) -> Callable[[Episodes], tuple]:
    """``compute`` remembering its result for the last episodes it saw."""
    last: list = [None, None]

    def cached(e: Episodes) -> tuple:
        if last[0] is not e:
            last[:] = e, compute(e)
        return last[1]

    return cached


def make_baselines(exp: Experiment, plain: dict, frozen: dict,
                   pretrained: Callable[[], dict]) -> dict[str, BaselineFn]:
    """name -> episodes -> per-task metric (``plain_init``: its adaptation curves). ``pretrained()`` gives the
    pretrained backbone; it is called only if a chosen baseline reads its features."""
    names = chosen(exp)
    classes = exp.task.num_classes
    if any(name in NEEDS_PRETRAINED for name in names):
        backbone = pretrained()
        embed = mx.vmap(lambda x: exp.model.features(backbone, x))  # task by task, as the model sees a task
    # The pretrained features (prototype, linear_probe) and the raw-input features (nearest_centroid,
    # logistic_regression) of the last episodes: each pair of baselines shares one computation.
    chunk = exp.cfg.evaluation.chunk_size  # tasks embedded at once, as the curves adapt them (bounds memory)
    embedded = lambda x: np.concatenate([flat(embed(x[lo: lo + chunk])) for lo in range(0, len(x), chunk)])
    features = last_episodes(lambda e: (embedded(e.xs), embedded(e.xq)))
    raw = last_episodes(lambda e: exp.task.raw_features(e.xs, e.xq))
    # the meta-validation tasks of the last K, and their features: a tuned read-out chooses on them
    validation = last_episodes(lambda e: validation_episodes(exp, shots_of(exp, e)))
    val_features = last_episodes(lambda v: (embedded(v.xs), embedded(v.xq)))
    val_raw = last_episodes(lambda v: exp.task.raw_features(v.xs, v.xq))
    grid, grid_name = (exp.cfg.probe.logistic_c, "C") if classes else (exp.cfg.probe.ridge_alpha, "alpha")

    def tuned_read_out(e: Episodes, read_out: Callable, test_inputs: Callable, val_inputs: Callable):
        """``read_out(value, support, ys, query, yq)`` over the inputs (episodes -> (support, query)) at the grid
        value chosen on the meta-validation tasks of e's K: (per-task test scores, that choice)."""
        val = validation(e)
        (vs, vq), (ts, tq) = val_inputs(val), test_inputs(e)
        return tuned(read_out, list(grid), (vs, val.ys, vq, val.yq), (ts, e.ys, tq, e.yq), exp.task.higher_is_better,
                     grid_name)

    def prototype(e: Episodes) -> np.ndarray:
        support, query = features(e)
        return nearest_centroid(support, e.ys, query, e.yq, classes)

    def linear_probe(e: Episodes) -> tuple[np.ndarray, dict]:
        if classes:
            read_out = lambda c, xs, ys, xq, yq: logistic_regression(l2_normalized(xs), ys, l2_normalized(xq), yq, c)
        else:
            read_out = lambda alpha, xs, ys, xq, yq: ridge_mse(xs, ys, xq, yq, alpha)
        return tuned_read_out(e, read_out, features, val_features)

    def raw_logistic_regression(e: Episodes) -> tuple[np.ndarray, dict]:
        return tuned_read_out(e, lambda c, xs, ys, xq, yq: logistic_regression(xs, ys, xq, yq, c),
                              raw, val_raw)

    def oracle(e: Episodes) -> tuple[np.ndarray, dict]:
        """``finetune`` over the backbone the task family knows to be right (``task=low_rank``: A*)."""
        known = merge(frozen, exp.task.oracle_backbone())
        return tuned_finetune(exp, lambda w, x, y: exp.loss(w, known, x, y), lambda w, x, y: exp.metric(w, known, x, y),
                              plain, e)

    def finetune(e: Episodes, head_only: bool = False) -> tuple[np.ndarray, dict]:
        """Fine-tuned on each support set with the settings validation chose (``metapeft.finetune``)."""
        if exp.peft.uses_pretrained_backbone:  # the run's PEFT method from its plain start, over the backbone
            start, over = plain, frozen
        else:  # the whole pretrained network with a fresh head; nothing is frozen
            start, over = {**without_head(backbone), **{k: v for k, v in plain.items() if k == "head"}}, {}
        if not head_only:
            return tuned_finetune(exp, lambda w, x, y: exp.loss(w, over, x, y),
                                  lambda w, x, y: exp.metric(w, over, x, y), start, e)
        # the body is the pretrained backbone, fixed: its features (as the feature baselines embed them) are
        # computed once, and the head alone is trained on them
        chunked = lambda x: mx.array(embedded(x), dtype=mx.float32)
        head_output = lambda head, f: exp.model.head_output(head, f)
        return tuned_finetune(exp, lambda head, f, y: exp.task.loss(head_output(head, f), y),
                              lambda head, f, y: exp.task.metric(head_output(head, f), y), start.get("head", {}), e,
                              inputs=lambda e: Episodes(chunked(e.xs), e.ys, chunked(e.xq), e.yq))

    def language_model(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The pretrained language model's score per task on these inputs and targets, ``chunk`` tasks at a time."""
        score = mx.vmap(lambda x, y: exp.task.metric(exp.model(backbone, x), y))
        return np.concatenate([np.array(score(mx.array(x[lo: lo + chunk]), mx.array(y[lo: lo + chunk])))
                               for lo in range(0, len(x), chunk)])

    def in_context(e: Episodes) -> tuple[np.ndarray, dict]:
        ids, targets, demonstrations = exp.task.in_context(np.array(e.xs), np.array(e.xq), np.array(e.yq))
        return language_model(ids, targets), {"mean_demonstrations": float(demonstrations.mean()),
                                              "context_length": exp.task.context_length}

    retrained: list = []  # the multi-task retrained start, once for every K

    def multitask_finetune(e: Episodes) -> tuple[np.ndarray, dict]:
        if not retrained:
            retrained.extend(multitask_retrained(exp, plain, frozen))
        values, facts = tuned_finetune(exp, lambda w, x, y: exp.loss(w, frozen, x, y),
                                       lambda w, x, y: exp.metric(w, frozen, x, y), retrained[0], e)
        return values, {**facts, **retrained[1]}

    table: dict[str, BaselineFn] = {
        "multitask_finetune": multitask_finetune,
        "zero_shot": lambda e: language_model(np.array(e.xq), np.array(e.yq)),
        "in_context": in_context,
        "finetune": finetune,
        "oracle": oracle,
        "finetune_head": lambda e: finetune(e, head_only=True),
        "plain_init": lambda e: plain_init_curves(exp, plain, frozen, e, exp.cfg.evaluation.curve_steps),
        "nearest_centroid": lambda e: nearest_centroid(raw(e)[0], e.ys, raw(e)[1], e.yq, classes),
        "nearest_neighbour": lambda e: nearest_neighbour(raw(e)[0], e.ys, raw(e)[1], e.yq),
        "logistic_regression": raw_logistic_regression,
        "prototype": prototype,
        "linear_probe": linear_probe,
        "zero": lambda e: np.mean(flat(e.yq) ** 2, axis=(1, 2)),
        "support_mean": lambda e: np.mean((flat(e.yq) - flat(e.ys).mean(axis=1, keepdims=True)) ** 2, axis=(1, 2)),
    }
    return {name: table[name] for name in names}


def skipped_for_cost(exp: Experiment) -> list[str]:
    """The baselines that apply but this run's mode left out for their cost."""
    return [name for name in applicable(exp) if name not in chosen(exp) and exp.cfg.baselines is None]
