"""``logger=tensorboard``: TensorBoard event files (through tensorboardX; ``pip install -e ".[tensorboard]"``).

Scalars: ``train/loss`` every meta-iteration, ``val/metric`` at every validation, the final K-shot figures at the
last iteration; the resolved config as text. Read them with ``tensorboard --logdir <run dir>/tensorboard``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from metapeft.loggers.base import Logger, final_figures, flat_params
from metapeft.registry import LOGGERS


@dataclass
class TensorBoardConfig:
    log_dir: Optional[str] = None  # default: <run dir>/tensorboard


@LOGGERS.register("tensorboard", TensorBoardConfig)
class TensorBoardLogger(Logger):
    extra = "tensorboard"

    def __init__(self, cfg):
        super().__init__(cfg)
        from tensorboardX import SummaryWriter

        self.writer_class = SummaryWriter

    def log_run(self, run_cfg, out_dir, metrics, history) -> None:
        writer = self.writer_class(logdir=str(self.cfg.log_dir or out_dir / "tensorboard"))
        try:
            params = flat_params(run_cfg)
            writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()), 0)
            last = 0
            if history is not None:
                for row in history.itertuples(index=False):
                    writer.add_scalar("train/loss", row.loss, row.iteration)
                    if "val_metric" in history and row.val_metric == row.val_metric:  # not NaN
                        writer.add_scalar("val/metric", row.val_metric, row.iteration)
                last = int(history.iteration.max())
            for name, value in final_figures(metrics).items():
                writer.add_scalar(name.replace(".", "/", 1), value, last)
        finally:
            writer.close()
