"""Sweeps: resuming completed jobs, isolating failures, and listing every failed job when the sweep ends."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from metapeft.config import NON_IDENTIFYING_KEYS
from metapeft.launchers import missing_plugin

log = logging.getLogger("metapeft.sweep")


def identifying(overrides: Sequence[str]) -> list[str]:
    return sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in NON_IDENTIFYING_KEYS)


def completed_metrics(out_dir: Path, overrides: Sequence[str]) -> dict | None:
    """The stored metrics of this very job (same overrides) if it already completed, else None."""
    path = Path(out_dir) / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same_job = identifying(metrics.get("identity", {}).get("overrides", [])) == identifying(overrides)
    return metrics if metrics.get("status") == "completed" and same_job else None


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


class SweepReport(Callback):
    """Before a multirun: refuse a launcher or sweeper whose plugin is not installed, saying what to install.
    At its end: list every job that failed or diverged, and exit non-zero if there was one."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        for role in ("launcher", "sweeper"):
            message = missing_plugin(str(config.hydra[role].get("_target_", "")))
            if message:
                log.error("hydra/%s=%s: %s", role, config.hydra.runtime.choices.get(f"hydra/{role}"), message)
                raise SystemExit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        jobs = job_statuses(Path(config.hydra.sweep.dir))
        bad = [j for j in jobs if j["status"] != "completed"]
        log.info("sweep finished: %d of %d jobs completed in %s", len(jobs) - len(bad), len(jobs),
                 config.hydra.sweep.dir)
        if bad:
            for job in bad:
                log.error("%s job %s (%s): %s", job["status"].upper(), job["dir"], " ".join(job["overrides"] or []),
                          job["reason"])
            raise SystemExit(1)
