"""``logger=csv``: the run's own files, ``metrics.json`` and ``history.csv``, written by every run anyway."""
from __future__ import annotations

from dataclasses import dataclass

from metapeft.loggers.base import Logger
from metapeft.registry import LOGGERS


@dataclass
class CsvLoggerConfig:
    pass


@LOGGERS.register("csv", CsvLoggerConfig)
class CsvLogger(Logger):
    def log_run(self, run_cfg, out_dir, metrics, history) -> None:
        pass  # experiment.run has written them
