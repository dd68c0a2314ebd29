from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from metapeft.config import register_configs

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
REPO = Path(__file__).resolve().parents[1]


def compose_config(*overrides: str, config_name: str = "config"):
    """Compose the runner's config in-process, as ``python runners/run.py OVERRIDES`` would
    (``config_name="transfer_study"``: as ``runners/transfer.py`` would)."""
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        return compose(config_name=config_name, overrides=["progress=false", *overrides])


@pytest.fixture
def compose_cfg():
    return compose_config
