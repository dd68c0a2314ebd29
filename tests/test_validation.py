"""The validation suite passes on real quick runs, and fails (exit 1, FAIL recorded) when a claim does not hold."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO, compose_config
from metapeft.validation import CHECKS, Suite, validate


@pytest.mark.slow  # the whole validation suite in quick mode: over a minute on 2 cores
def test_every_check_passes_in_quick_mode(tmp_path):
    results = validate(Suite(compose_config, tmp_path))
    assert {name: r["status"] for name, r in results["checks"].items()} == {name: "PASS" for name in CHECKS}
    assert results["passed"] and json.dumps(results)
    assert results["checks"]["save_load"]["measured"]["identical_evaluation"]


@pytest.mark.slow  # the whole suite again, in a subprocess
def test_a_failing_claim_fails_the_suite(tmp_path):
    # With a zero inner learning rate the support set cannot matter, so 5 shots cannot beat 1.
    completed = subprocess.run([sys.executable, str(REPO / "runners" / "validate.py"), "algorithm.inner_lr=0"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 1, completed.stderr
    results = json.loads((tmp_path / "outputs" / "validation" / "validation_results.json").read_text())
    assert results["checks"]["few_shot"]["status"] == "FAIL" and not results["passed"]
    assert "few_shot               FAIL" in completed.stdout + completed.stderr
    assert results["checks"]["parameter_efficiency"]["status"] == "PASS"  # the other checks still ran
