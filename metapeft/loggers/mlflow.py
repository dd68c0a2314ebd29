"""``logger=mlflow``: one MLflow run per metapeft run (``pip install -e ".[mlflow]"``).

Params: the resolved config (dotted keys). Metrics: ``loss`` at every meta-iteration and ``val_metric`` at every
validation (step = iteration), then the final K-shot figures with their CIs. Artifacts: ``metrics.json``,
``history.csv``, plots and the checkpoint. Tracking store: ``logger.mlflow.tracking_uri`` (a server such as
``http://127.0.0.1:5000``, or a database); default ``sqlite:///mlflow.db`` in the folder the command runs in, with
artifacts in ``./mlartifacts``, which is what ``mlflow ui`` opens there. A server that does not answer costs
seconds, not minutes: ``request_timeout`` and ``max_retries`` bound MLflow's HTTP requests (its own defaults: a
120 s timeout and 7 retries with back-off factor 2), unless the environment sets
``MLFLOW_HTTP_REQUEST_TIMEOUT`` / ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` itself.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from metapeft.loggers.base import Logger, artifacts, final_figures, flat_params, history_series
from metapeft.registry import LOGGERS

BATCH = 1000  # MLflow accepts at most 1,000 metrics per log_batch call


@dataclass
class MlflowConfig:
    tracking_uri: Optional[str] = None  # default: sqlite:///<where the command runs>/mlflow.db
    experiment_name: str = "metapeft"
    run_name: Optional[str] = None  # default: the run directory's name
    request_timeout: float = 10.0  # seconds per HTTP request to a tracking server
    max_retries: int = 2  # retries of a failed HTTP request (back-off 1 s, 2 s)


@LOGGERS.register("mlflow", MlflowConfig)
class MlflowLogger(Logger):
    requires, extra = "mlflow.tracking", "mlflow"

    def log_run(self, run_cfg, out_dir, metrics, history) -> None:
        from mlflow.entities import Metric, Param, RunTag

        # MLflow reads whole seconds ("10.0" fails its int() and, with it, the whole logger)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, math.ceil(self.cfg.request_timeout))))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(self.cfg.max_retries))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        here = launch_directory()
        client = self.package.MlflowClient(tracking_uri=self.cfg.tracking_uri or f"sqlite:///{here / 'mlflow.db'}")
        experiment = client.get_experiment_by_name(self.cfg.experiment_name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        elif self.cfg.tracking_uri is None:  # a local database: artifacts beside it, where mlflow ui looks
            experiment_id = client.create_experiment(self.cfg.experiment_name,
                                                     artifact_location=(here / "mlartifacts").as_uri())
        else:  # a server decides where artifacts go
            experiment_id = client.create_experiment(self.cfg.experiment_name)
        run = client.create_run(experiment_id, run_name=self.cfg.run_name or out_dir.name,
                                tags={"metapeft.status": metrics.get("status", ""), "metapeft.run_dir": str(out_dir)})
        run_id, now = run.info.run_id, int(time.time() * 1000)
        params = [Param(k, v[:6000]) for k, v in flat_params(run_cfg).items()]
        series = history_series(history)
        entries = [Metric(name, value, now, iteration) for name, points in series.items()
                   for iteration, value in points]
        last = series["loss"][-1][0] if series["loss"] else 0
        entries += [Metric(name, float(value), now, last) for name, value in final_figures(metrics).items()]
        for lo in range(0, max(len(params), len(entries)), BATCH):
            client.log_batch(run_id, metrics=entries[lo: lo + BATCH], params=params[lo: lo + 100],
                             tags=[RunTag("metapeft.task", str(run_cfg.task.name))] if lo == 0 else [])
        for path in artifacts(out_dir):
            client.log_artifact(run_id, str(path), artifact_path="checkpoint" if path.parent.name == "checkpoint"
                                else None)
        client.set_terminated(run_id, "FINISHED" if metrics.get("status") == "completed" else "FAILED")


def launch_directory() -> Path:
    from hydra.utils import get_original_cwd

    try:
        return Path(get_original_cwd())
    except ValueError:  # not under Hydra (the Python API, tests)
        return Path.cwd()
