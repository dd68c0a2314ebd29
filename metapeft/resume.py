"""Resuming an interrupted run: the training state written atomically with every validation, and the record of
a finished meta-training that lets a run stopped during evaluation resume there.

``checkpoint/training.safetensors`` + ``training.json`` hold a ``TrainState`` (meta-parameters, frozen tree,
optimizer state, the method's state, what was kept), the history so far and the task sampler's state;
``trained.json`` holds what the run reports of a finished meta-training. ``resume=true`` reads them back only whole
and only for the same overrides. A SIGINT or SIGTERM while they are written lands after the write.
"""
from __future__ import annotations

import math
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from metapeft import io
from metapeft.backend import mx, utils
from metapeft.errors import ConfigError
from metapeft.train import TrainLog, TrainState


def _unflatten_like(expected: Any, flat: dict[str, mx.array], prefix: str, path: Path) -> Any:
    """The arrays saved under ``prefix`` arranged exactly as ``expected`` is (its dicts may have dotted keys)."""
    wanted = utils.tree_flatten(expected)
    bad = [k for k, v in wanted if f"{prefix}.{k}" not in flat or flat[f"{prefix}.{k}"].shape != v.shape]
    if bad:
        raise ConfigError("resume", f"{path} does not fit this run's {prefix} (first mismatch: {prefix}.{bad[0]}); "
                          "was it written by another configuration?")
    leaves = iter(flat[f"{prefix}.{k}"] for k, _ in wanted)
    return utils.tree_map(lambda _: next(leaves), expected)


@contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM while a training checkpoint is written: a stop lands after it, not inside it.

    The handlers are swapped for a recorder (a signal that arrived just before, whose Python handler has not run
    yet, is recorded too) and the recorded signals are raised again once the files are written."""
    received: list[int] = []
    try:
        previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                    for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in received:
            signal.raise_signal(number)


def save_training_state(directory: Path, state: TrainState, log: TrainLog, sampler: np.random.Generator,
                        job: list[str]) -> None:
    """Everything an interrupted run needs to continue: arrays in ``training.safetensors``, the rest (history,
    the task sampler's state, the overrides it belongs to) in ``training.json``, both stamped with the iteration."""
    arrays = {"meta": state.meta, "frozen": state.frozen, "optimizer": state.optimizer,
              "peft_state": state.peft_state or {}}
    if state.kept is not None:
        arrays["kept"] = {"meta": state.kept[0], "frozen": state.kept[1]}
    record = {"iteration": state.iteration, "validations_since_kept": state.validations_since_kept,
              "has_kept": state.kept is not None, "overrides": job, "sampler": sampler.bit_generator.state,
              "log": dict(vars(log))}
    with signals_deferred():
        io.save_tree(directory / "training.safetensors", arrays, metadata={"iteration": str(state.iteration)})
        io.write_json(directory / "training.json", record)


def load_training_state(directory: Path, expected: TrainState, log: TrainLog, sampler: np.random.Generator,
                        job: list[str]) -> TrainState:
    """The saved ``TrainState`` (arranged like ``expected``); restores ``log`` and ``sampler`` in place."""
    path = directory / "training.safetensors"
    try:
        record = io.read_json(directory / "training.json")
        flat, metadata = mx.load(str(path), return_metadata=True)
    except (OSError, ValueError, RuntimeError) as error:  # missing, truncated or corrupt
        raise ConfigError("resume", f"{directory}: the training state cannot be read ({type(error).__name__}: "
                          f"{error}); start a new run directory") from error
    if record["overrides"] != job:
        raise ConfigError("resume", f"{directory} holds the training state of a run with other overrides "
                          f"({' '.join(record['overrides'])}); resume it with those, or start a new run directory")
    if metadata.get("iteration") != str(record["iteration"]):
        raise ConfigError("resume", f"{directory}: training.safetensors and training.json are from different "
                          "iterations (stopped while writing them?); start a new run directory")
    meta = _unflatten_like(expected.meta, flat, "meta", path)
    frozen = _unflatten_like(expected.frozen, flat, "frozen", path)
    kept = None
    if record["has_kept"]:
        kept = (_unflatten_like(expected.meta, flat, "kept.meta", path),
                _unflatten_like(expected.frozen, flat, "kept.frozen", path))
    peft_state = expected.peft_state
    if expected.peft_state:
        peft_state = _unflatten_like(expected.peft_state, flat, "peft_state", path)
    restore_log(log, record["log"])
    sampler.bit_generator.state = record["sampler"]
    return TrainState(record["iteration"], meta, frozen, _unflatten_like(expected.optimizer, flat, "optimizer", path),
                      peft_state, kept, record["validations_since_kept"])


def restore_log(log: TrainLog, saved: dict) -> None:
    """Fill ``log`` in place from its saved ``vars`` (NaN came back from JSON as null)."""
    for key, value in saved.items():
        if key == "rows":
            value = [{k: math.nan if v is None else v for k, v in row.items()} for row in value]
        elif value is None:
            value = math.nan
        setattr(log, key, value)


def save_training_done(directory: Path, train: dict, log: TrainLog, job: list[str]) -> None:
    """Meta-training has finished and the checkpoint is written: ``trained.json`` holds what the run reports of
    its training, so that a run stopped during evaluation resumes there instead of meta-training again."""
    with signals_deferred():
        io.write_json(directory / "trained.json", {"overrides": job, "train": train, "log": dict(vars(log))})


def load_training_done(directory: Path, log: TrainLog, job: list[str]) -> dict:
    """The ``train`` facts of a run whose meta-training had finished (``save_training_done``); restores ``log``."""
    try:
        record = io.read_json(directory / "trained.json")
        train, saved_log, overrides = record["train"], record["log"], record["overrides"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError("resume", f"{directory}/trained.json cannot be read ({type(error).__name__}: {error}); "
                          "start a new run directory") from error
    if overrides != job:
        raise ConfigError("resume", f"{directory} holds the meta-training of a run with other overrides "
                          f"({' '.join(overrides)}); resume it with those, or start a new run directory")
    restore_log(log, saved_log)
    return train

