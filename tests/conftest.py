from __future__ import annotations

import pytest

from helpers import compose_config
from metapeft import backend

# Load the BLAS and MLX as the runners do, before any test module imports mlx.core itself.
backend.load()


@pytest.fixture
def compose_cfg():
    return compose_config
