"""``logger=tensorboard``: TensorBoard event files (through tensorboardX; ``pip install -e ".[tensorboard]"``).

Scalars: ``train/loss`` every meta-iteration, ``val/metric`` at every validation, the final K-shot figures at the
last iteration; the resolved config as text. Read them with ``tensorboard --logdir <run dir>/tensorboard``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from metapeft.loggers.base import Logger, final_figures, flat_params, history_series
from metapeft.registry import LOGGERS


@dataclass
class TensorBoardConfig:
    log_dir: Optional[str] = None  # default: <run dir>/tensorboard


@LOGGERS.register("tensorboard", TensorBoardConfig)
class TensorBoardLogger(Logger):
    requires, extra = "tensorboardX", "tensorboard"

    def log_run(self, run_cfg, out_dir, metrics, history) -> None:
        writer = self.package.SummaryWriter(logdir=str(self.cfg.log_dir or out_dir / "tensorboard"))
        try:
            params = flat_params(run_cfg)
            writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()), 0)
            series = history_series(history)
            for name, tag in (("loss", "train/loss"), ("val_metric", "val/metric")):
                for iteration, value in series[name]:
                    writer.add_scalar(tag, value, iteration)
            last = series["loss"][-1][0] if series["loss"] else 0
            for name, value in final_figures(metrics).items():
                writer.add_scalar(name.replace(".", "/", 1), value, last)
        finally:
            writer.close()
