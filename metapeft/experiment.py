"""One run: build from the config, meta-train, evaluate next to the baselines, write the run directory.

Data flows one way: config -> task family, backbone, PEFT split (adapted tree, frozen tree) -> algorithm
meta-training -> evaluation -> files (``metrics.json``, ``history.csv``, ``checkpoint/``).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import time
import traceback
from pathlib import Path
from typing import Sequence

import numpy as np
from omegaconf import DictConfig

from metapeft import affinity, blas, distributed, io, machine, native
from metapeft.backend import mx, use_device
from metapeft.baselines import chosen, make_baselines, skipped_for_cost
from metapeft.build import Experiment, InitialState, build, initial_state, parameter_counts, pretrained
from metapeft.checkpoint import evaluation_config, load_checkpoint, save_checkpoint
from metapeft.config import GROUPS, Keep
from metapeft.errors import ConfigError, DivergedError, Interrupted, WriteFailed, require
from metapeft.evaluate import evaluate_shots, learner_curves
from metapeft.loggers.base import active_loggers, log_everywhere
from metapeft.measure import PhaseTimes, inference_ms_per_sample, memory_mb
from metapeft.resume import load_training_done, load_training_state, save_training_done, save_training_state
from metapeft.sweep import identifying
from metapeft.train import MetaTraining, TrainLog, TrainState, meta_train

logger = logging.getLogger("metapeft")


def progress_label(cfg: DictConfig, overrides: Sequence[str], width: int = 60) -> str:
    """What names a run's progress bars: its identifying overrides (in a sweep, what tells the jobs apart), else
    its algorithm and PEFT method."""
    label = " ".join(identifying(overrides)) or f"{cfg.algorithm.name}+{cfg.peft.name}"
    return label if len(label) <= width else label[: width - 1] + "…"


def identity(cfg: DictConfig, overrides: Sequence[str]) -> dict:
    return {**{g: cfg[g].name for g in GROUPS}, "seed": cfg.get("seed"), "overrides": list(overrides)}


def run(cfg: DictConfig, out_dir: Path, overrides: Sequence[str] = (), start_up_seconds: float | None = None) -> dict:
    """Run one experiment into ``out_dir``. Writes ``metrics.json`` whatever happens, then re-raises failures.

    With ``train=false`` the saved run's own config is evaluated, with ``overrides`` (the command line) on top.
    ``start_up_seconds``: how long the process ran before this run began (the runner says; see ``seconds``).
    Under ``mlx.launch`` every process runs it and only the first writes (``metapeft.distributed``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext() if distributed.is_main() else io.muted(out_dir):
        return run_here(cfg, out_dir, overrides, start_up_seconds)


def run_here(cfg: DictConfig, out_dir: Path, overrides: Sequence[str], start_up_seconds: float | None) -> dict:
    earlier = earlier_record(out_dir / "metrics.json")
    metrics: dict = {"status": "running", "identity": identity(cfg, overrides)}
    log = TrainLog()
    loggers = []
    started = time.perf_counter()
    phases = PhaseTimes()
    if start_up_seconds is not None:
        phases.seconds["start_up"] = start_up_seconds
    lock = None
    try:
        if distributed.is_main():  # one writer at a time: a resume never races a job still running there
            lock = hold_directory(out_dir)
            io.write_text(out_dir / RESERVE, " " * RESERVE_BYTES)  # room for a final record on a disk that fills
        if not cfg.train and cfg.checkpoint is not None:
            cfg = evaluation_config(cfg, overrides)
            metrics["identity"] = identity(cfg, overrides)
        loggers = active_loggers(cfg)  # a logger whose package is missing is refused before any work
        metrics["device"] = use_device(cfg.device)
        exp = build(cfg)
        io.write_json(out_dir / "metrics.json", metrics)  # status running: a sweep shows what is under way
        metrics.update(train_and_evaluate(exp, out_dir, log, overrides, phases))
        metrics["status"] = "completed"
        return metrics
    except DivergedError as error:
        metrics.update(status="diverged", reason=str(error), diverged_at_iteration=error.iteration)
        raise
    except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM turned into Interrupted by the runner
        metrics.update(status="interrupted", reason=str(error) or "stopped by SIGINT",
                       interrupted_at_iteration=len(log.rows))  # history.csv's rows: one per finished iteration
        raise
    except ConfigError as error:  # refused before any work: aggregation leaves it out of its tables
        metrics.update(status="refused", reason=str(error), config_key=error.key)
        error.record = out_dir / ("refused.json" if earlier is not None else "metrics.json")
        raise
    except WriteFailed as error:  # a full disk: the reason is the file, no traceback (a smaller record may still fit)
        metrics.update(status="failed", reason=str(error))
        raise
    except BaseException as error:
        if distributed.peer_lost(error):  # another process of this mlx.launch run was stopped: so is this one
            metrics.update(status="interrupted", reason=f"another process of this run stopped ({error})",
                           interrupted_at_iteration=len(log.rows))
            raise Interrupted("SIGTERM") from error
        metrics.update(status="failed", reason=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        raise
    finally:
        with phases.phase("writing_results"), contextlib.suppress(WriteFailed):  # a full disk: written what fits
            if log.rows:
                import pandas as pd  # here, not at import: pandas is a fifth of the runner's start-up

                io.write_csv(out_dir / "history.csv", pd.DataFrame(log.rows))
        metrics["total_seconds"] = time.perf_counter() - started
        metrics["seconds"] = time_breakdown(phases, metrics["total_seconds"])
        try:
            if metrics["status"] == "refused" and earlier is not None:  # a refusal never overwrites a run's record
                io.write_json(out_dir / "refused.json", metrics)
                io.write_json(out_dir / "metrics.json", earlier)
                logger.info("the refusal is recorded in %s; metrics.json keeps the earlier run's record (%s)",
                            out_dir / "refused.json", earlier.get("status"))
            else:
                io.write_json(out_dir / "metrics.json", metrics)
        except WriteFailed as error:  # the disk filled: the reserve makes room for the status and the reason
            io.remove(out_dir / RESERVE)
            try:
                io.write_json(out_dir / "metrics.json", short_record(metrics, error))
                logger.error("%s; metrics.json records the status and the reason only", error)
            except WriteFailed:  # metrics.json keeps its last complete version (atomic writes)
                logger.error("%s; %s keeps its last complete version", error, out_dir / "metrics.json")
        io.remove(out_dir / RESERVE)
        if metrics["status"] == "completed":  # evaluated: nothing left to resume
            io.remove(out_dir / "checkpoint" / "trained.json")
        if lock is not None:
            lock.close()
        if metrics["status"] != "refused" and distributed.is_main():
            log_everywhere(loggers, cfg, out_dir, metrics)


RESERVE, RESERVE_BYTES = ".metapeft.reserve", 16384  # released to write the final record when the disk is full


def short_record(metrics: dict, error: WriteFailed) -> dict:
    """What a run's final record keeps when the whole one does not fit: status (a run still ``running`` when its
    record could not be written has failed), identity, reason."""
    status = "failed" if metrics["status"] in ("running", "completed") else metrics["status"]
    reason = metrics.get("reason") or f"the final record did not fit: {error}"
    return {"status": status, "identity": metrics["identity"], "reason": reason,
            "total_seconds": metrics.get("total_seconds")}


def hold_directory(out_dir: Path):
    """An exclusive lock on ``out_dir`` for this process (released when the returned file closes, or the process
    ends); refused, naming the directory, while another process holds it."""
    lock = open(out_dir / ".metapeft.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ConfigError("hydra.run.dir", f"{out_dir} is in use by another metapeft process (a job still running "
                          "there?): let it finish or stop it, then resume") from None
    return lock


def earlier_record(path: Path) -> dict | None:
    """The metrics.json of an earlier run in this directory (interrupted, completed, ...), if there is one."""
    try:
        record = io.read_json(path)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("status") not in (None, "refused") else None


def time_breakdown(phases: PhaseTimes, total: float) -> dict:
    """Where a run's time went: start-up (the runner's imports, composition, MLX; when the runner says when it
    started), pretraining and initialization, meta-training (the steps alone), validation, training-state
    writes, checkpoint, evaluation (the model and every baseline), inference timing, writing results, other."""
    seconds = dict(phases.seconds)
    if "meta_training_with_checks" in seconds:
        seconds["meta_training"] = seconds.pop("meta_training_with_checks") - seconds.get("validation", 0.0) - \
            seconds.get("training_state_writes", 0.0)
    run_total = total + seconds.get("start_up", 0.0)
    seconds["other"] = max(0.0, run_total - sum(seconds.values()))
    seconds["total"] = run_total
    return seconds


def train_and_evaluate(exp: Experiment, out_dir: Path, log: TrainLog, overrides: Sequence[str] = (),
                       phases: PhaseTimes | None = None) -> dict:
    cfg, learner, task = exp.cfg, exp.learner, exp.task
    phases = phases or PhaseTimes()
    chosen(exp)  # a bad `baselines` list is refused before any work
    require(cfg.algorithm.meta_batch_size >= distributed.size(), "algorithm.meta_batch_size",
            f"must be >= the number of processes ({distributed.size()}, mlx.launch -n) so that each has a task, "
            f"got {cfg.algorithm.meta_batch_size}")
    mx.random.seed(cfg.seed)
    mx.reset_peak_memory()
    with phases.phase("pretraining_and_initialization"):
        start = initial_state(exp)
    meta = learner.initial_meta(start.adapted, exp.peft.learnable_backbone(start.frozen))
    frozen = start.frozen
    train_rng = np.random.default_rng([cfg.seed, 0])
    val_episodes = exp.meta_validation_episodes()

    def validate(meta: dict, frozen: dict) -> float:
        curves = learner_curves(exp, meta, frozen, val_episodes, cfg.algorithm.num_inner_steps)
        return float(curves[:, -1].mean())

    validate = phases.timed("validation", validate)

    if cfg.train:
        directory, job = out_dir / "checkpoint", identifying(overrides)
        if cfg.resume and (directory / "trained.json").exists():  # stopped after meta-training had finished
            train = {**load_training_done(directory, log, job), "resumed_from_iteration": log.iterations}
            meta, frozen = load_checkpoint(directory, meta, frozen)
            logger.info("meta-training had finished (%d iterations): evaluating what %s holds", train["iterations"],
                        directory)
            return evaluate_run(exp, start, meta, frozen, train, phases)
        better = None if cfg.keep == Keep.last else (lambda new, old: new > old if task.higher_is_better else new < old)
        peft_state = exp.peft.init_meta_state(meta["weights"])
        resume_from = None
        if cfg.resume and (directory / "training.json").exists():  # an interrupted run: go on where it stopped
            optimizer = learner.make_optimizer(cfg.mode.num_iterations)
            optimizer.init(meta)
            expected = TrainState(0, meta, frozen, optimizer.state, peft_state, None, 0)
            resume_from = load_training_state(directory, expected, log, train_rng, job)
            logger.info("resuming meta-training at iteration %d from %s", resume_from.iteration, directory)
        elif cfg.resume:
            logger.info("resume=true: %s holds no interrupted run to go on with; starting afresh", directory)
        io.remove(directory / "trained.json")  # an earlier run's, here: this run trains anew
        until_meta_training = phases.since_process_start()  # start-up as a user waits for it
        with phases.phase("meta_training_with_checks"):
            meta, frozen = meta_train(learner, meta, frozen, MetaTraining(
                sample_batch=lambda: learner.training_batch(task, cfg.algorithm.meta_batch_size, cfg.shots.train,
                                                            train_rng),
                num_iterations=cfg.mode.num_iterations, validate=validate, val_interval=cfg.mode.val_interval,
                progress=cfg.progress, after_step=exp.peft.after_meta_step, after_step_state=peft_state,
                better=better, patience=cfg.patience,
                keep_from=exp.peft.first_keepable_iteration(cfg.mode.num_iterations),
                snapshot=phases.timed("training_state_writes",
                                      lambda state: save_training_state(directory, state, log, train_rng, job)),
                resume_from=resume_from, label=progress_label(cfg, job),
            ), log)
        train = {
            "iterations": log.iterations,
            # compilation is in the first iteration: per-iteration time is measured without it
            "seconds_per_iteration": (log.step_seconds - log.first_step_seconds) / max(1, log.iterations - 1)
            if log.iterations > 1 else log.step_seconds,
            "first_iteration_seconds": log.first_step_seconds,
            "seconds_to_first_iteration": until_meta_training,  # from the process's start; null in later sweep jobs
            "train_seconds": log.step_seconds,
            "final_loss": log.rows[-1]["loss"],
            "final_val_metric": log.rows[-1]["val_metric"],
            "kept": str(cfg.keep),
            "kept_iteration": log.kept_iteration,  # the saved and evaluated meta-parameters are this iteration's
            "kept_val_metric": log.kept_val_metric,
            "stopped_early": log.stopped_early,  # patience ran out; iterations says when
            "resumed_from_iteration": resume_from.iteration if resume_from else None,  # an interrupted run went on
        }
        with phases.phase("checkpoint_writing"):
            save_checkpoint(directory, meta, frozen, cfg)
            save_training_done(directory, train, log, job)  # with it, a stop in evaluation resumes there
        for name in ("training.safetensors", "training.json"):  # meta-training is done: nothing of it to resume
            io.remove(directory / name)
    else:
        meta, frozen = load_checkpoint(Path(cfg.checkpoint), meta, frozen)
        train = {"iterations": 0, "from_checkpoint": str(cfg.checkpoint), "final_val_metric": validate(meta, frozen)}
    return evaluate_run(exp, start, meta, frozen, train, phases)


def evaluate_run(exp: Experiment, start: InitialState, meta: dict, frozen: dict, train: dict,
                 phases: PhaseTimes) -> dict:
    """Evaluation, inference timing and what the run reports, for meta-parameters trained now or loaded."""
    cfg = exp.cfg
    mx.random.seed(cfg.seed)  # evaluation draws the same dropout masks whether trained now or loaded
    pretraining, pretraining_seconds = dict(start.pretraining), [0.0]

    def pretrained_backbone() -> dict:  # peft=none: pretrained for the feature baselines alone, recorded all the same
        started = time.perf_counter()
        backbone, facts = pretrained(exp)
        pretraining.update(facts)
        pretraining_seconds[0] += time.perf_counter() - started
        return backbone

    evaluation_seconds: dict = {}
    with phases.phase("evaluation"):
        baselines = make_baselines(exp, start.plain, frozen, pretrained_backbone)
        evaluation = evaluate_shots(exp, meta, frozen, baselines, evaluation_seconds)
    # the baselines' backbone is pretraining's time, not evaluation's, though it is first needed there
    phases.seconds["evaluation"] -= pretraining_seconds[0]
    phases.seconds["pretraining_and_initialization"] = \
        phases.seconds.get("pretraining_and_initialization", 0.0) + pretraining_seconds[0]
    with phases.phase("inference_timing"):
        inference_ms = inference_ms_per_sample(exp.peft.__call__, meta["weights"],
                                               exp.learner.task_frozen(meta, frozen), start.sample_inputs)
    return {
        "evaluation": evaluation,
        "evaluation_seconds": evaluation_seconds,  # K -> the meta-learned model's and each baseline's seconds
        "train": train,
        "parameters": parameter_counts(exp, start.backbone, start.adapted, meta),
        "inference_ms_per_sample": inference_ms,
        "memory": memory_mb(),
        "machine": machine.describe(),  # timings from two processors do not compare
        "blas": blas.status(),
        "native_kernels": native.status(),  # whether model.kernels could use them (metapeft/native)
        "processes": distributed.size(),  # mlx.launch -n: sums and dropout masks split over processes differ
        "cpu_affinity": affinity.status(),
        "peft": exp.peft.report(frozen),
        "task": exp.task.report(),
        "pretraining": pretraining,
        "baselines_below_full_strength": below_full_strength(cfg, pretraining, evaluation, skipped_for_cost(exp)),
    }


def below_full_strength(cfg: DictConfig, pretraining: dict, evaluation: dict,
                        skipped: Sequence[str] = ()) -> list[str]:
    """Where a baseline may have run below its full strength, in words (also logged): a baseline the mode left out
    for its cost (``mode.skipped_baselines``), a pretrained backbone that hit its iteration cap before validation
    stalled, a mode that cuts the tuned baselines' budgets (``mode.baselines_at_full_strength=false``), a tuned
    baseline whose choice sits at its grid's edge."""
    notes = []
    if skipped:
        notes.append(f"mode={cfg.mode.name} left out {', '.join(skipped)} for its cost (mode.skipped_baselines): "
                     "the best baseline here may not be the strongest; baselines=null mode.skipped_baselines=[] or "
                     "mode=full runs every one")
    if str(pretraining.get("stopped", "")).startswith("reached pretrain.iterations"):
        notes.append(f"pretraining reached its cap of {pretraining['iterations']} iterations (mode={cfg.mode.name}) "
                     "before meta-validation stopped improving: the feature and fine-tuning baselines may be "
                     "under-trained")
    choices = {name: baseline["chosen_on_validation"] for shot in evaluation["shots"].values()
               for name, baseline in shot["baselines"].items() if "chosen_on_validation" in baseline}
    if choices and not cfg.mode.baselines_at_full_strength:
        tuned, grids = sorted(choices), sorted(name for name, choice in choices.items() if "steps" in choice)
        mode = cfg.mode
        notes.append(f"mode={mode.name} cuts the tuned baselines' budgets for speed: {', '.join(tuned)} chose their "
                     f"settings on {mode.baseline_val_tasks} validation tasks"
                     + (f", {', '.join(grids)} from {len(cfg.finetune.learning_rates)} learning rates x steps "
                        f"{list(mode.finetune_steps)}" if grids else "") + "; mode=full runs them at full strength")
    for k, shot in evaluation["shots"].items():
        for name, baseline in shot["baselines"].items():
            choice = baseline.get("chosen_on_validation") or {}
            if choice.get("at_grid_edge"):
                setting = next((key for key in ("C", "alpha", "learning_rate") if key in choice), "setting")
                notes.append(f"{name} at K={k}: its {setting} and step choice sit at an edge of its grid; a wider "
                             "grid may do better" if "steps" in choice else
                             f"{name} at K={k}: its {setting} ({choice[setting]:g}) sits at an edge of its grid; a "
                             "wider grid may do better")
    for note in notes:
        logger.warning("baseline below full strength: %s", note)
    return notes
