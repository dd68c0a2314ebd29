"""The validation suite: ``python runners/validate.py [mode=quick|full] [seed=N] [key=value ...]``.

Makes its own runs (MAML on sinusoid, digits and glyphs, a transfer study) and prints PASS or FAIL for each check:
convergence, few-shot, parameter efficiency, task embeddings, task similarity, cross-task transfer, save/load.
Overrides apply to every run of the suite (the suite chooses each run's task).
Writes ``outputs/validation/validation_results.json`` and exits 1 if any check fails. Quick mode takes under a
minute on 2 cores.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_original_cwd
from omegaconf import DictConfig

from metapeft import affinity, backend, io
from metapeft.config import register_configs
from metapeft.validation import Suite, validate

log = logging.getLogger("metapeft")
register_configs()


def compose_config(*overrides: str, config_name: str = "config") -> DictConfig:
    return compose(config_name=config_name, overrides=list(overrides))


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    runs = Path(HydraConfig.get().runtime.output_dir)
    backend.load()
    affinity.colocate()  # one process, runs one after another: as a single run of runners/run.py
    suite = Suite(compose_config, runs, common=tuple(HydraConfig.get().overrides.task))
    results = validate(suite, lambda name, result: log.info("%-22s %s%s", name, result["status"],
                                                             f"  ({result['error']})" if "error" in result else ""))
    path = Path(get_original_cwd()) / cfg.paths.output_dir / "validation" / "validation_results.json"
    io.write_json(path, results)
    log.info("%s: %d of %d checks passed; results in %s, runs in %s", "PASS" if results["passed"] else "FAIL",
             sum(r["status"] == "PASS" for r in results["checks"].values()), len(results["checks"]), path, runs)
    if not results["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
