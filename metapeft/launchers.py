"""Hydra's launcher plugins as metapeft uses them: which optional extra each needs, and how many CPU threads each
job of a sweep gets so that parallel jobs do not oversubscribe the cores."""
from __future__ import annotations

import importlib.util
import os

from omegaconf import DictConfig

# plugin module -> the extra of pyproject.toml that installs it
PLUGIN_EXTRAS = {
    "hydra_plugins.hydra_ray_launcher": "ray",
    "hydra_plugins.hydra_submitit_launcher": "slurm",
    "hydra_plugins.hydra_optuna_sweeper": "optuna",
}


def missing_plugin(target: str) -> str | None:
    """What to install, if the plugin that ``target`` (a launcher's or sweeper's ``_target_``) lives in is absent."""
    for module, extra in PLUGIN_EXTRAS.items():
        if target.startswith(module) and importlib.util.find_spec(module) is None:
            return (f"{target.rsplit('.', 1)[-1]} needs the package of {module.split('.')[-1].replace('_', '-')}: "
                    f'pip install -e ".[{extra}]"')
    return None


def threads_per_job(launcher: DictConfig, cores: int | None = None) -> int | None:
    """CPU threads for one job of a sweep under this launcher; None where the launcher leaves it open."""
    cores = cores or os.cpu_count() or 1
    target = str(launcher.get("_target_", ""))
    if "joblib" in target and launcher.get("n_jobs"):
        n_jobs = launcher.n_jobs
        return max(1, cores // (cores if n_jobs < 0 else min(n_jobs, cores)))
    if "ray_launcher" in target:
        return int(launcher.ray.remote.get("num_cpus") or 1)
    if "submitit" in target and launcher.get("cpus_per_task"):
        return int(launcher.cpus_per_task)
    return None
