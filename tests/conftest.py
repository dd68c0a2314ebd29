from __future__ import annotations

import os

import pytest

from helpers import compose_config
from metapeft import backend

# With several test workers on the machine's cores, each worker's BLAS (and its runs' subprocesses', which inherit
# this) on one thread: OpenBLAS's spinning threads oversubscribed the cores and made the suite 1.5x slower. A test of
# the thread count sets its own.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("METAPEFT_BLAS_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Load the BLAS and MLX as the runners do, before any test module imports mlx.core itself.
backend.load()


@pytest.fixture
def compose_cfg():
    return compose_config
