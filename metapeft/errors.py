"""Errors the runner turns into clear messages and non-zero exits."""
from __future__ import annotations


class ConfigError(ValueError):
    """An impossible configuration value, caught before any training. Names the key and what is valid."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


def require(condition: bool, key: str, message: str) -> None:
    """Raise ``ConfigError(key, message)`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(key, message)


class DivergedError(RuntimeError):
    """The meta-training loss became NaN or infinite."""

    def __init__(self, iteration: int, loss: float):
        self.iteration = iteration
        self.loss = loss
        super().__init__(f"meta-training loss became {loss} at iteration {iteration}")


class WriteFailed(OSError):
    """A file could not be written (the disk is full, most often): names the path; what was written before is
    intact, since every write goes to a temporary file that replaces the old one only when complete."""

    def __init__(self, path, cause: BaseException, disk_full: bool):
        self.path, self.disk_full = str(path), disk_full
        why = "no space left on the device" if disk_full else f"{type(cause).__name__}: {cause}"
        super().__init__(f"cannot write {path}: {why}")


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (SIGINT, or SIGTERM as Slurm sends on timeout or preemption)."""

    def __init__(self, signal_name: str):
        self.signal_name = signal_name
        super().__init__(f"stopped by {signal_name}")


# Signals the runner received. Its handler raises ``Interrupted`` and records the signal here too, because an
# exception raised while MLX is tracing a function for ``mx.compile`` can be lost inside MLX; the training loop
# checks this list every iteration, so a stop always lands.
STOP_REQUESTS: list[str] = []


def stop_requested() -> None:
    """Raise ``Interrupted`` if a stop signal arrived and its exception did not end the run."""
    if STOP_REQUESTS:
        raise Interrupted(STOP_REQUESTS[0])
