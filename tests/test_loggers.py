"""Experiment loggers: TensorBoard events and an MLflow server read back, a missing package refused before any
work, a failing logger leaving the run's own files complete; metrics.json says `running` while a run runs."""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pytest

from helpers import REPO
from metapeft import experiment
from metapeft.errors import ConfigError
from metapeft.experiment import run

TINY = ["mode=tiny", "shots.eval=[1,5]"]


def read_events(path):
    """Every event of a TensorBoard event file (TFRecord: length, its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto import event_pb2

    events, data = [], path.read_bytes()
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset: offset + 8])
        event = event_pb2.Event()
        event.ParseFromString(data[offset + 12: offset + 12 + length])
        events.append(event)
        offset += 12 + length + 4
    return events


def test_tensorboard_events_hold_the_loss_history_and_the_final_figures(compose_cfg, tmp_path):
    pytest.importorskip("tensorboardX", reason="pip install -e '.[tensorboard]'")
    metrics = run(compose_cfg(*TINY, "logger=[csv,tensorboard]"), tmp_path)
    (events_file,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    scalars: dict[str, list] = {}
    for event in read_events(events_file):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    history = pd.read_csv(tmp_path / "history.csv")
    assert [step for step, _ in scalars["train/loss"]] == history.iteration.tolist()
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(history.loss.tolist(), rel=1e-6)
    assert len(scalars["val/metric"]) == history.val_metric.notna().sum()
    expected = metrics["evaluation"]["shots"]["5"]["meta_learned"]
    assert scalars["test/5shot.meta_learned.mean"][0][1] == pytest.approx(expected["mean"], rel=1e-6)
    assert scalars["test/5shot.meta_learned.ci95"][0][1] == pytest.approx(expected["ci95"], rel=1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    pytest.importorskip("mlflow", reason="pip install -e '.[mlflow]'")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # its uvicorn and task workers are killed with it
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(server.pid, signal.SIGKILL)
        pytest.fail("mlflow server did not start in 90 s")
    yield uri
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


@pytest.mark.slow  # starting the server takes 10-15 s
def test_a_run_logged_to_an_mlflow_server_reads_back_through_the_client(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    completed = subprocess.run([sys.executable, "runners/run.py", *TINY, "logger=[csv,mlflow]",
                                f"logger.mlflow.tracking_uri={mlflow_server}", f"hydra.run.dir={tmp_path / 'run'}",
                                "progress=false"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    client = MlflowClient(tracking_uri=mlflow_server)
    (logged,) = client.search_runs([client.get_experiment_by_name("metapeft").experiment_id])
    assert logged.info.status == "FINISHED" and logged.data.params["task.name"] == "sinusoid"
    assert logged.data.params["algorithm.inner_lr"] == "0.01"  # resolved, not the interpolation
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    losses = client.get_metric_history(logged.info.run_id, "loss")
    assert sorted(m.step for m in losses) == history.iteration.tolist()
    assert logged.data.metrics["test.5shot.meta_learned.mean"] == pytest.approx(
        metrics["evaluation"]["shots"]["5"]["meta_learned"]["mean"])
    names = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"metrics.json", "history.csv", "checkpoint"} <= names


def test_a_logger_whose_package_is_missing_is_refused_before_any_work(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"logger tensorboard needs the package tensorboardX.*\[tensorboard\]"):
        run(compose_cfg(*TINY, "logger=[csv,tensorboard]"), tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "refused"
    assert not (tmp_path / "history.csv").exists()


def test_a_failing_logger_leaves_the_run_complete(compose_cfg, tmp_path, caplog):
    pytest.importorskip("mlflow")
    metrics = run(compose_cfg(*TINY, "logger=[csv,mlflow]", "logger.mlflow.tracking_uri=nonexistent-scheme://x"),
                  tmp_path)
    assert metrics["status"] == "completed"
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "completed"
    assert "logger MlflowLogger failed" in caplog.text


def test_an_unreachable_mlflow_server_costs_seconds_not_minutes(compose_cfg, tmp_path, caplog, monkeypatch):
    pytest.importorskip("mlflow")
    for name in ("TIMEOUT", "MAX_RETRIES", "BACKOFF_FACTOR"):
        monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{name}", raising=False)
    started = time.perf_counter()
    nobody = f"logger.mlflow.tracking_uri=http://127.0.0.1:{free_port()}"  # a port no server listens on
    metrics = run(compose_cfg(*TINY, "logger=[csv,mlflow]", nobody), tmp_path)
    assert metrics["status"] == "completed" and "logger MlflowLogger failed" in caplog.text
    assert "Failed to convert" not in caplog.text  # it failed to connect, not to read its settings ("10.0")
    assert time.perf_counter() - started < 60  # MLflow's own defaults: 7 retries with growing back-off


def test_metrics_json_says_running_while_the_run_runs(compose_cfg, tmp_path, monkeypatch):
    seen = []
    original = experiment.train_and_evaluate

    def spy(exp, out_dir, *args, **kwargs):
        seen.append(json.loads((out_dir / "metrics.json").read_text())["status"])
        return original(exp, out_dir, *args, **kwargs)

    monkeypatch.setattr(experiment, "train_and_evaluate", spy)
    assert run(compose_cfg(*TINY), tmp_path)["status"] == "completed"
    assert seen == ["running"]


def test_wandb_writes_an_offline_run_with_the_runs_files(compose_cfg, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="pip install -e '.[wandb]'")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(compose_cfg(*TINY, "logger=[csv,wandb]"), tmp_path)
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    assert (offline / "files" / "metrics.json").read_text() == (tmp_path / "metrics.json").read_text()
    assert list(offline.glob("run-*.wandb"))
