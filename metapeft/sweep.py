"""Sweeps: resuming completed jobs, isolating failures, and listing every failed job when the sweep ends."""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import yaml
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from metapeft.config import identifies
from metapeft.launchers import missing_plugin
from metapeft.sweep_stop import forward_stop

log = logging.getLogger("metapeft.sweep")


def identifying(overrides: Sequence[str]) -> list[str]:
    return sorted(o for o in overrides if identifies(o.split("=", 1)[0]))


def completed_metrics(out_dir: Path, overrides: Sequence[str]) -> dict | None:
    """The stored metrics of this very job (same overrides) if it already completed, else None."""
    path = Path(out_dir) / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same_job = identifying(metrics.get("identity", {}).get("overrides", [])) == identifying(overrides)
    return metrics if metrics.get("status") == "completed" and same_job else None


def expected_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """The override lists of every job a basic-sweeper multirun was asked for (``multirun.yaml``); None for other
    sweepers (an Optuna study decides its trials as it goes)."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.exists():
        return None
    hydra_cfg = yaml.safe_load(path.read_text()).get("hydra", {})
    if "BasicSweeper" not in str(hydra_cfg.get("sweeper", {}).get("_target_", "")):
        return None
    params = hydra_cfg.get("sweeper", {}).get("params") or {}
    lines = [*(f"{k}={v}" for k, v in params.items()), *hydra_cfg.get("overrides", {}).get("task", [])]
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(lines), max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


def job_statuses(sweep_dir: Path) -> list[dict]:
    """Status of every job directory (one holding ``.hydra/``) under a sweep directory."""
    jobs = []
    for hydra_dir in sorted(Path(sweep_dir).glob("**/.hydra")):
        job_dir = hydra_dir.parent
        try:
            metrics = json.loads((job_dir / "metrics.json").read_text())
        except (OSError, ValueError) as error:
            metrics = {"status": "failed", "reason": f"no readable metrics.json ({type(error).__name__})"}
        jobs.append({"dir": str(job_dir), "status": metrics.get("status", "unknown"),
                     "reason": metrics.get("reason", ""), "overrides": metrics.get("identity", {}).get("overrides")})
    return jobs


class SweepProgress(threading.Thread):
    """While a sweep runs: a line each time a job starts or ends, "k of N jobs done (F failed, R running), ETA"."""

    def __init__(self, sweep_dir: Path, interval: float = 1.0):
        super().__init__(daemon=True, name="metapeft-sweep-progress")
        self.sweep_dir, self.interval = Path(sweep_dir), interval
        self.started, self.stopped = time.monotonic(), threading.Event()
        self.last: tuple | None = None
        self.total: int | None = None  # from multirun.yaml, once Hydra has written it

    def line(self) -> str | None:
        if self.total is None and (expected := expected_jobs(self.sweep_dir)):
            self.total = len(expected)
        statuses = []
        for hydra_dir in self.sweep_dir.glob("**/.hydra"):
            try:
                statuses.append(json.loads((hydra_dir.parent / "metrics.json").read_text())["status"])
            except (OSError, ValueError, KeyError):
                statuses.append("running")  # started, not yet past writing its first metrics.json
        running = statuses.count("running")
        done = len(statuses) - running
        interrupted = statuses.count("interrupted")
        failed = done - statuses.count("completed") - interrupted
        counts = (done, failed, interrupted, running)
        if counts == self.last or done == 0:
            self.last = counts
            return None
        self.last = counts
        total = self.total
        elapsed = time.monotonic() - self.started
        eta = ""
        if total and done < total:
            eta = f", about {elapsed / done * (total - done) / 60:.1f} min left"
        stopped = f"{interrupted} interrupted, " if interrupted else ""
        return (f"sweep: {done} of {total or '?'} jobs done ({failed} failed, {stopped}{running} running), "
                f"{elapsed / 60:.1f} min{eta}")

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                message = self.line()
            except Exception:  # noqa: BLE001 - a progress line must never stop a sweep
                continue
            if message:
                log.info(message)


RUNNING_PROGRESS: dict[str, SweepProgress] = {}


class SweepReport(Callback):
    """Before a multirun: refuse a launcher or sweeper whose plugin is not installed, saying what to install, start
    the "k of N jobs done" line and forward a SIGTERM to the jobs (``metapeft.sweep_stop``). At its end: list every
    job that failed or diverged, and exit non-zero if there was one."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        for role in ("launcher", "sweeper"):
            message = missing_plugin(str(config.hydra[role].get("_target_", "")))
            if message:
                log.error("hydra/%s=%s: %s", role, config.hydra.runtime.choices.get(f"hydra/{role}"), message)
                raise SystemExit(2)
        forward_stop(Path(config.hydra.sweep.dir))  # SIGTERM reaches jobs in worker processes too
        # Kept outside the callback: launchers pickle the callbacks to send them to their workers.
        RUNNING_PROGRESS[str(config.hydra.sweep.dir)] = progress = SweepProgress(Path(config.hydra.sweep.dir))
        progress.start()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        progress = RUNNING_PROGRESS.pop(str(config.hydra.sweep.dir), None)
        if progress is not None:
            progress.stopped.set()
        jobs = job_statuses(Path(config.hydra.sweep.dir))
        bad = [j for j in jobs if j["status"] != "completed"]
        log.info("sweep finished: %d of %d jobs completed in %s", len(jobs) - len(bad), len(jobs),
                 config.hydra.sweep.dir)
        if bad:
            for job in bad:
                log.error("%s job %s (%s): %s", job["status"].upper(), job["dir"], " ".join(job["overrides"] or []),
                          job["reason"])
            raise SystemExit(1)
