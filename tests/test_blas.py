"""The optimized BLAS changes speed, not results: the same meta-gradient as MLX's bundled BLAS."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO
from metapeft import blas

SCRIPT = """
import json
import numpy as np
from mlx.utils import tree_flatten
from metapeft import blas
from metapeft.backend import mx
from metapeft.build import build
from tests.helpers import compose_config
exp = build(compose_config("task=digits", "algorithm.num_inner_steps=2"))
weights = exp.peft.init_adapted({}, mx.random.key(0), None)
meta = exp.learner.meta_parameters(weights)
episodes = exp.task.sample("train", 4, 5, np.random.default_rng(0))
loss, grads = exp.learner.meta_value_and_grad(meta, {}, episodes)
print(json.dumps({"blas": blas.status()["backend"], "loss": loss.item(),
                  "grads": [np.array(v).ravel().tolist() for _, v in tree_flatten(grads)]}))
"""


def meta_gradient_with(backend: str) -> dict:
    env = {**os.environ, "METAPEFT_BLAS": backend, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(blas.status()["backend"] != "openblas", reason=f"OpenBLAS not in use: {blas.status()}")
def test_openblas_gives_the_bundled_blas_results():
    fast, reference = meta_gradient_with("openblas"), meta_gradient_with("bundled")
    assert (fast["blas"], reference["blas"]) == ("openblas", "bundled")
    assert fast["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    for a, b in zip(fast["grads"], reference["grads"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def mkl_installed() -> bool:
    try:
        return importlib.metadata.distribution("mkl") is not None
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not mkl_installed(), reason="the mkl wheel is not installed (pip install -e '.[mkl]')")
def test_mkl_gives_the_bundled_blas_results():
    fast, reference = meta_gradient_with("mkl"), meta_gradient_with("bundled")
    assert (fast["blas"], reference["blas"]) == ("mkl", "bundled")
    assert fast["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert fast["grads"] != reference["grads"]  # MKL's products round differently: it is the one in use
    for a, b in zip(fast["grads"], reference["grads"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_mkl_asked_for_but_missing_is_refused_with_the_install_command():
    hide_mkl = ("import importlib.metadata as metadata\n"
                "def missing(name): raise metadata.PackageNotFoundError(name)\n"
                "metadata.distribution = missing\n"
                "from metapeft import backend; backend.load()")
    env = {**os.environ, "METAPEFT_BLAS": "mkl", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", hide_mkl], env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "METAPEFT_BLAS=mkl but it could not be loaded" in result.stderr
    assert "pip install -e '.[mkl]'" in result.stderr


def test_unknown_blas_setting_is_refused():
    env = {**os.environ, "METAPEFT_BLAS": "fastest", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", "from metapeft import backend; backend.load()"], env=env,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "valid values are auto, bundled, openblas, mkl" in result.stderr
