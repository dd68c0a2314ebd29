"""The metapeft runner: ``python runners/run.py [group=option ...] [key=value ...]`` (add ``--multirun`` to sweep).

Builds the model, meta-trains, evaluates against the scratch baseline and writes ``metrics.json``, ``history.csv``
and ``checkpoint/`` into the Hydra run directory.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from metapeft import blas  # noqa: E402
from metapeft.config import register_configs  # noqa: E402
from metapeft.errors import ConfigError, DivergedError  # noqa: E402
from metapeft.experiment import run  # noqa: E402

log = logging.getLogger("metapeft")
register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    log.info("BLAS for MLX's CPU matmuls: %s", blas.status())
    try:
        metrics = run(cfg, out_dir, overrides=hydra_cfg.overrides.task)
    except ConfigError as error:
        log.error("invalid configuration: %s", error)
        sys.exit(2)
    except DivergedError as error:
        log.error("run diverged: %s; history.csv and metrics.json kept in %s", error, out_dir)
        sys.exit(3)
    evaluation = metrics["evaluation"]
    for k, result in evaluation["shots"].items():
        ours, base = result["meta_learned"], result["scratch"]
        log.info("%s-shot %s: %s %.4f ± %.4f | scratch %.4f ± %.4f", k, evaluation["metric"], cfg.algorithm.name,
                 ours["mean"], ours["ci95"], base["mean"], base["ci95"])
    log.info("%.2f ms per meta-iteration; outputs in %s", 1e3 * metrics["train"]["seconds_per_iteration"], out_dir)
    return metrics["train"]["final_val_metric"]


if __name__ == "__main__":
    main()
