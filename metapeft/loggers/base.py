"""What every logger receives, once a run has written its files: the resolved config, the history
(``history.csv``: loss every meta-iteration, validation every ``mode.val_interval``) and ``metrics.json``."""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from metapeft.errors import ConfigError
from metapeft.registry import LOGGERS

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("metapeft")


class Logger:
    requires: str = ""  # the module it needs, imported when the logger is built (a missing one is refused then)
    extra: str = ""  # the optional dependency group that installs it

    def __init__(self, cfg):
        self.cfg = cfg
        self.package = importlib.import_module(self.requires) if self.requires else None

    def log_run(self, run_cfg: DictConfig, out_dir: Path, metrics: dict, history: pd.DataFrame | None) -> None:
        raise NotImplementedError


def flat_params(run_cfg: DictConfig) -> dict[str, str]:
    """The resolved config as dotted keys, the way tracking tools show parameters."""
    flat: dict[str, str] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = str(node)

    walk(OmegaConf.to_container(run_cfg, resolve=True), "")
    return flat


def history_series(history: pd.DataFrame | None) -> dict[str, list[tuple[int, float]]]:
    """``loss`` at every meta-iteration and ``val_metric`` at every check, as (iteration, value) pairs."""
    if history is None:
        return {"loss": [], "val_metric": []}
    series = {}
    for name in ("loss", "val_metric"):
        rows = history.dropna(subset=[name]) if name in history else history.iloc[:0]
        series[name] = [(int(i), float(v)) for i, v in zip(rows.iteration, rows[name])]
    return series


def final_figures(metrics: dict) -> dict[str, float]:
    """K-shot figures with their CIs and the paired difference to the best baseline, as flat metric names."""
    figures: dict[str, float] = {}
    for k, result in ((metrics.get("evaluation") or {}).get("shots") or {}).items():
        for side, values in [("meta_learned", result["meta_learned"]), *(
                (f"baseline.{name}", b) for name, b in result.get("baselines", {}).items())]:
            figures[f"test.{k}shot.{side}.mean"] = values["mean"]
            figures[f"test.{k}shot.{side}.ci95"] = values["ci95"]
        if "versus_best_baseline" in result:
            figures[f"test.{k}shot.versus_best_baseline.difference"] = result["versus_best_baseline"]["difference"]
            figures[f"test.{k}shot.versus_best_baseline.ci95"] = result["versus_best_baseline"]["ci95"]
    train = metrics.get("train") or {}
    for key in ("seconds_per_iteration", "train_seconds", "final_loss", "kept_val_metric"):
        if isinstance(train.get(key), (int, float)):
            figures[f"train.{key}"] = float(train[key])
    return figures


def artifacts(out_dir: Path) -> list[Path]:
    """The run's files worth keeping next to its figures: metrics, history, plots and the checkpoint."""
    names = ["metrics.json", "history.csv", *(p.name for p in sorted(out_dir.glob("*.png")))]
    files = [out_dir / n for n in names if (out_dir / n).is_file()]
    return files + sorted(p for p in (out_dir / "checkpoint").glob("*") if p.is_file())


def active_loggers(run_cfg: DictConfig) -> list[Logger]:
    """The loggers ``logger=[...]`` selected, built now so that a missing package is refused before training."""
    chosen = run_cfg.get("logger") or {}
    loggers = []
    for name in chosen:
        implementation = LOGGERS.get(name)
        try:
            loggers.append(implementation(chosen[name]))
        except ImportError as error:
            raise ConfigError("logger", f"logger {name} needs the package {error.name}: "
                                        f"pip install -e \".[{implementation.extra}]\"") from error
    return loggers


def log_everywhere(loggers: list[Logger], run_cfg: DictConfig, out_dir: Path, metrics: dict) -> None:
    """Each logger in turn; one that fails is reported and skipped: the run's own files are already written."""
    if not loggers:
        return
    import pandas as pd  # only when a logger needs the history: pandas slows the runner's start-up

    history = pd.read_csv(out_dir / "history.csv") if (out_dir / "history.csv").exists() else None
    for logger in loggers:
        try:
            logger.log_run(run_cfg, out_dir, metrics, history)
        except Exception as error:  # noqa: BLE001 - a tracking server being down must not fail a finished run
            log.warning("logger %s failed (%s: %s); the run's files in %s are complete", type(logger).__name__,
                        type(error).__name__, error, out_dir)
