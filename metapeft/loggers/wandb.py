"""``logger=wandb``: Weights & Biases, offline by default (``pip install -e ".[wandb]"``; ``wandb sync`` uploads
later; ``logger.wandb.mode=online`` with a logged-in account sends it now). Logs what the MLflow logger logs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from metapeft.loggers.base import Logger, artifacts, final_figures, flat_params
from metapeft.registry import LOGGERS


@dataclass
class WandbConfig:
    project: str = "metapeft"
    mode: str = "offline"
    dir: Optional[str] = None  # default: the run directory


@LOGGERS.register("wandb", WandbConfig)
class WandbLogger(Logger):
    extra = "wandb"

    def __init__(self, cfg):
        super().__init__(cfg)
        import wandb

        self.wandb = wandb

    def log_run(self, run_cfg, out_dir, metrics, history) -> None:
        run = self.wandb.init(project=self.cfg.project, mode=self.cfg.mode, dir=str(self.cfg.dir or out_dir),
                              name=out_dir.name, config=flat_params(run_cfg), reinit=True)
        try:
            if history is not None:
                for r in history.itertuples(index=False):
                    row = {"loss": float(r.loss)}
                    if "val_metric" in history and r.val_metric == r.val_metric:
                        row["val_metric"] = float(r.val_metric)
                    run.log(row, step=int(r.iteration))
            run.summary.update(final_figures(metrics))
            for path in artifacts(out_dir):
                run.save(str(path), base_path=str(out_dir), policy="now")
        finally:
            run.finish()
