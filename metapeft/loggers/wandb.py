"""``logger=wandb``: Weights & Biases, offline by default (``pip install -e ".[wandb]"``; ``wandb sync`` uploads
later; ``logger.wandb.mode=online`` with a logged-in account sends it now). Logs what the MLflow logger logs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from metapeft.loggers.base import Logger, artifacts, final_figures, flat_params, history_series
from metapeft.registry import LOGGERS


@dataclass
class WandbConfig:
    project: str = "metapeft"
    mode: str = "offline"
    dir: Optional[str] = None  # default: the run directory


@LOGGERS.register("wandb", WandbConfig)
class WandbLogger(Logger):
    requires, extra = "wandb", "wandb"

    def log_run(self, run_cfg, out_dir, metrics, history) -> None:
        run = self.package.init(project=self.cfg.project, mode=self.cfg.mode, dir=str(self.cfg.dir or out_dir),
                              name=out_dir.name, config=flat_params(run_cfg), reinit=True)
        try:
            rows: dict[int, dict[str, float]] = {}
            for name, points in history_series(history).items():
                for iteration, value in points:
                    rows.setdefault(iteration, {})[name] = value
            for iteration in sorted(rows):
                run.log(rows[iteration], step=iteration)
            run.summary.update(final_figures(metrics))
            for path in artifacts(out_dir):
                run.save(str(path), base_path=str(out_dir), policy="now")
        finally:
            run.finish()
