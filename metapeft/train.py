"""The meta-training loop: a compiled meta-step, a progress bar, a loss history and a divergence guard."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from tqdm import tqdm

from metapeft import distributed
from metapeft.algorithms.base import MetaLearner
from metapeft.backend import mx, utils
from metapeft.errors import DivergedError, stop_requested
from metapeft.streams import ParallelStreams
from metapeft.tasks.base import Episodes, as_episodes


@dataclass
class TrainLog:
    """Filled while training runs, so a caller can save it even when training stops early."""

    rows: list[dict] = field(default_factory=list)
    step_seconds: float = 0.0  # sampling, meta-step and after_step; validation excluded
    first_step_seconds: float = 0.0  # the first iteration alone: it includes compiling the meta-step
    iterations: int = 0
    kept_iteration: int = -1  # the iteration whose meta-parameters meta_train returned
    kept_val_metric: float = math.nan
    stopped_early: bool = False  # patience ran out before num_iterations


@dataclass
class TrainState:
    """All that ``meta_train`` needs to go on after an interruption, as data (saved with every validation)."""

    iteration: int  # the next iteration to run
    meta: dict
    frozen: dict
    optimizer: dict  # the optimizer's state tree
    peft_state: Any  # after_step's state (AdaLoRA: importance averages)
    kept: tuple[dict, dict] | None  # the meta-parameters and frozen tree kept so far
    validations_since_kept: int


def compiled_meta_step(learner: MetaLearner, optimizer) -> Callable:
    """One outer update, compiled with the optimizer state declared as input and output.

    Returns the loss, the updated meta-parameters and the meta-gradient (AdaLoRA reads its importance from it).
    With ``algorithm.tasks_per_pass`` smaller than the meta-batch, the gradient is taken pass by pass (each pass
    compiled, evaluated before the next so that its activations are freed) and averaged by tasks. With
    ``algorithm.parallel_passes=N``, N passes are evaluated at once, each on a CPU stream of its own evaluated by a
    thread of its own (``metapeft.streams``); their gradients are summed in pass order. Under
    ``mlx.launch`` each process takes the gradient of its share of the meta-batch and the shares are summed,
    weighted by their sizes (``metapeft.distributed``): every process applies the same update.
    """
    state = [optimizer.state, mx.random.state]  # random state: LoRA's dropout
    per_pass, parallel = learner.cfg.tasks_per_pass, learner.cfg.parallel_passes

    def step(meta, frozen, *batch):
        loss, grads = learner.meta_value_and_grad(meta, frozen, as_episodes(*batch))
        return loss, optimizer.apply_gradients(grads, meta), grads

    if per_pass is None and parallel == 1 and distributed.size() == 1:
        return mx.compile(step, inputs=state, outputs=state)

    one_pass = mx.compile(lambda meta, frozen, *tasks: learner.meta_value_and_grad(meta, frozen, as_episodes(*tasks)),
                          inputs=[mx.random.state], outputs=[mx.random.state])
    update = mx.compile(optimizer.apply_gradients, inputs=[optimizer.state], outputs=[optimizer.state])
    streams = ParallelStreams(parallel) if parallel > 1 else None

    def accumulated_step(meta, frozen, *batch):
        lo, hi = distributed.share(batch[0].shape[0])  # one process: the whole batch
        mine, loss, grads = [a[lo:hi] for a in batch], 0.0, None
        pass_size = per_pass or -(-(hi - lo) // parallel)
        starts = list(range(0, hi - lo, pass_size))
        if streams is not None:  # a worker's thread cannot evaluate work left on this thread's stream
            mx.eval(meta, frozen, mine)
        for round_start in range(0, len(starts), parallel):  # `parallel` passes at once, one per stream
            passes = []
            for i, first in enumerate(starts[round_start: round_start + parallel]):
                with mx.stream(streams.streams[i]) if streams else contextlib.nullcontext():
                    tasks = [a[first: first + pass_size] for a in mine]
                    passes.append((tasks[0].shape[0], one_pass(meta, frozen, *tasks)))
            if streams is not None:
                streams.evaluate([out for _, out in passes])
            for size, (pass_loss, pass_grads) in passes:  # summed in pass order: reproducible
                share = size / (hi - lo)
                loss = loss + share * pass_loss
                grads = utils.tree_map(lambda g: share * g, pass_grads) if grads is None else \
                    utils.tree_map(lambda total, g: total + share * g, grads, pass_grads)
            mx.eval(loss, grads)  # frees the round's activations before the next
        loss, grads = distributed.weighted_sum((loss, grads), (hi - lo) / batch[0].shape[0])
        return loss, update(grads, meta), grads

    return accumulated_step


@dataclass
class MetaTraining:
    """What ``meta_train`` runs: where its tasks come from, how long, how it validates, what it keeps, and what runs
    between its iterations.

    ``after_step(meta_weights, meta_grads, frozen, state, iteration, num_iterations) -> (frozen, state)`` runs
    between iterations, its state (``after_step_state`` at first) passed from one call to the next. Given
    ``better(new, old)``, the meta-parameters kept are those with the best validation metric (early stopping's
    choice), else the last; given ``patience`` too, training stops once that many validations in a row have not
    been better. Validations before iteration ``keep_from`` are recorded but neither kept nor counted.
    ``snapshot(state)`` receives a ``TrainState`` after every validation; ``resume_from`` continues from one.
    """

    sample_batch: Callable[[], Episodes]
    num_iterations: int
    validate: Callable[[dict, dict], float]
    val_interval: int
    progress: bool = True
    after_step: Callable[[dict, dict, dict, Any, int, int], tuple[dict, Any]] | None = None
    after_step_state: Any = None
    better: Callable[[float, float], bool] | None = None
    patience: int | None = None
    keep_from: int = 0
    snapshot: Callable[[TrainState], None] | None = None
    resume_from: TrainState | None = None
    label: str = ""


def meta_train(learner: MetaLearner, meta: dict, frozen: dict, plan: MetaTraining, log: TrainLog) -> tuple[dict, dict]:
    """Run ``plan.num_iterations`` outer updates from ``meta``; return the meta-learned parameters and the frozen
    tree that ``plan`` keeps (see ``MetaTraining``), filling ``log`` as it goes (``log`` must hold the history up to
    ``plan.resume_from`` when resuming). Resuming gives the uninterrupted run's results, bit for bit, except for
    randomness inside the meta-step (LoRA's dropout), which is drawn afresh after the resume point.
    """
    num_iterations, validate, val_interval = plan.num_iterations, plan.validate, plan.val_interval
    after_step, after_step_state, better, patience = plan.after_step, plan.after_step_state, plan.better, plan.patience
    keep_from, snapshot, resume_from = plan.keep_from, plan.snapshot, plan.resume_from
    optimizer = learner.make_optimizer(num_iterations)
    first, kept, validations_since_kept = 0, None, 0
    if resume_from is not None:
        optimizer.state = resume_from.optimizer  # before compiling: the compiled step carries this state
        meta, frozen, after_step_state = resume_from.meta, resume_from.frozen, resume_from.peft_state
        first, kept, validations_since_kept = (resume_from.iteration, resume_from.kept,
                                               resume_from.validations_since_kept)
    optimizer.init(meta)
    step = compiled_meta_step(learner, optimizer)
    bar = tqdm(range(first, num_iterations), initial=first, total=num_iterations,
               desc=f"meta-train {plan.label or learner.cfg.name}", disable=not plan.progress, mininterval=1.0)
    for iteration in bar:
        stop_requested()
        start = time.perf_counter()
        loss, meta, grads = step(meta, frozen, *plan.sample_batch())
        mx.eval(loss, meta, grads)
        loss = loss.item()
        row = {"iteration": iteration, "loss": loss, "val_metric": math.nan}
        log.rows.append(row)
        if not math.isfinite(loss):
            raise DivergedError(iteration, loss)
        if after_step is not None:
            frozen, after_step_state = after_step(meta["weights"], grads["weights"], frozen, after_step_state,
                                                  iteration, num_iterations)
        seconds = time.perf_counter() - start
        log.step_seconds += seconds
        if iteration == 0:
            log.first_step_seconds = seconds
        log.iterations = iteration + 1
        if iteration % val_interval == 0 or iteration == num_iterations - 1:
            row["val_metric"] = validate(meta, frozen)
            bar.set_postfix(loss=f"{loss:.4f}", val=f"{row['val_metric']:.4f}")
            if iteration >= keep_from:
                if better is None or log.kept_iteration < 0 or better(row["val_metric"], log.kept_val_metric):
                    kept = meta, frozen  # arrays are immutable: keeping references copies nothing
                    log.kept_iteration, log.kept_val_metric = iteration, row["val_metric"]
                    validations_since_kept = 0
                else:
                    validations_since_kept += 1
            if snapshot is not None:
                snapshot(TrainState(iteration + 1, meta, frozen, optimizer.state, after_step_state, kept,
                                    validations_since_kept))
            if patience is not None and validations_since_kept >= patience:
                log.stopped_early = iteration < num_iterations - 1
                break
    return kept
