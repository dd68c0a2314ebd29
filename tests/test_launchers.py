"""The same sweep through Hydra's submitit and Ray launchers: same layout, same results, failures isolated."""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from helpers import CONF_DIR, REPO
from metapeft.config import register_configs
from metapeft.launchers import missing_plugin, threads_per_job
from metapeft.sweep import SweepReport
from runners.aggregate import main as aggregate

TINY = ["mode=tiny", "evaluation.curve_steps=5", "progress=false"]
GRID = ["algorithm=maml,reptile", "seed=0,1"]


def sweep(sweep_dir: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "runners/run.py", "--multirun", f"hydra.sweep.dir={sweep_dir}", *TINY,
                           *overrides], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def results(sweep_dir: Path) -> dict:
    """Job directory name -> what the job computed (its evaluation), independent of where it ran."""
    return {p.parent.name: json.loads(p.read_text())["evaluation"] for p in sweep_dir.glob("*/metrics.json")}


@pytest.fixture(scope="module")
def basic_grid(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("basic") / "sweep"
    completed = sweep(sweep_dir, "hydra/launcher=basic", *GRID)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return results(sweep_dir)


@pytest.mark.slow  # a second sweep through submitit's local executor
def test_submitit_local_grid_matches_the_basic_launcher(basic_grid, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    completed = sweep(tmp_path / "sweep", "hydra/launcher=submitit_local", *GRID)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert len(basic_grid) == 4 and results(tmp_path / "sweep") == basic_grid
    assert aggregate([str(tmp_path / "sweep"), "--out", str(tmp_path / "report")]) == 0


def test_a_launcher_whose_plugin_is_missing_says_what_to_install(monkeypatch, caplog):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert 'pip install -e ".[ray]"' in missing_plugin("hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher")
    assert 'pip install -e ".[slurm]"' in missing_plugin(
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher")
    assert missing_plugin("hydra._internal.core_plugins.basic_launcher.BasicLauncher") is None
    config = OmegaConf.create({"hydra": {
        "launcher": {"_target_": "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"},
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"},
        "runtime": {"choices": {"hydra/launcher": "ray"}}}})
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_:
        SweepReport().on_multirun_start(config)
    assert exit_.value.code == 2
    assert 'hydra/launcher=ray: RayLauncher needs the package of hydra-ray-launcher: pip install -e ".[ray]"' \
        in caplog.text


def test_each_job_gets_the_cpus_its_launcher_reserves():
    ray = OmegaConf.create({"_target_": "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher",
                            "ray": {"init": {"address": None}, "remote": {"num_cpus": 3}}})
    slurm = OmegaConf.create({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
                              "cpus_per_task": 4})
    joblib = OmegaConf.create({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
                               "n_jobs": 4})
    assert (threads_per_job(ray), threads_per_job(slurm), threads_per_job(joblib, cores=8)) == (3, 4, 2)
    assert threads_per_job(OmegaConf.create({"_target_": "hydra._internal.core_plugins.basic_launcher.X"})) is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_node_ray_cluster():
    """A head and a worker node on loopback, one CPU each, with token authentication (the default of recent Ray
    wherever a token exists); yields the address and the environment that carries the token. Stopped whatever
    the test does."""
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    port = free_port()
    common = ["--num-cpus=1", "--disable-usage-stats"]
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    try:
        subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                        "--include-dashboard=false", f"--temp-dir={temp_dir}", *common],
                       check=True, capture_output=True, timeout=180, env=env)
        subprocess.run([ray, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", *common],
                       check=True, capture_output=True, timeout=180, env=env)
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120, env=env)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_cluster_grid_matches_the_basic_launcher_and_isolates_a_failure(basic_grid, two_node_ray_cluster,
                                                                            tmp_path):
    address, env = two_node_ray_cluster
    on_ray = ["hydra/launcher=ray", f"hydra.launcher.ray.init.address={address}"]
    completed = sweep(tmp_path / "sweep", *on_ray, *GRID, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert results(tmp_path / "sweep") == basic_grid
    assert aggregate([str(tmp_path / "sweep"), "--out", str(tmp_path / "report")]) == 0

    failing = sweep(tmp_path / "failing", *on_ray, "algorithm=maml", "shots.train=5,0", env=env)
    assert failing.returncode == 1
    statuses = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "failing").glob("*/metrics.json")}
    assert sorted(m["status"] for m in statuses.values()) == ["completed", "refused"]
    bad = next(name for name, m in statuses.items() if m["status"] == "refused")
    assert statuses[bad]["config_key"] == "shots.train"
    assert f"REFUSED job {tmp_path / 'failing' / bad}" in failing.stderr + failing.stdout


@pytest.mark.parametrize("launcher, threads", [("ray", 1), ("submitit_local", 1), ("submitit_slurm", 2)])
def test_launcher_configs_compose_and_set_threads_per_job(launcher, threads):
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")
    assert threads_per_job(cfg.hydra.launcher) == threads
