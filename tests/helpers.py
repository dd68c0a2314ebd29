"""What several test files share: paths, in-process composition as the runners compose, and the runner's CLI."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from metapeft.config import register_configs

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO / "conf")


def compose_config(*overrides: str, config_name: str = "config", return_hydra_config: bool = False):
    """Compose the runner's config in-process, as ``python runners/run.py OVERRIDES`` would
    (``config_name="transfer_study"``: as ``runners/transfer.py`` would, once ``metapeft.transfer`` is imported)."""
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        return compose(config_name=config_name, overrides=["progress=false", *overrides],
                       return_hydra_config=return_hydra_config)


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python runners/run.py ARGS`` from the repository root, output captured."""
    return subprocess.run([sys.executable, "runners/run.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
