"""Code outside the package: the documentation's plugin example (docs/extending.md), run as written, through
METAPEFT_PLUGINS and through an entry point of an installed distribution."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import REPO


def docs_example(name: str) -> str:
    """The fenced block that follows ``<!-- plugin example: NAME -->`` in docs/extending.md."""
    page = (REPO / "docs" / "extending.md").read_text()
    match = re.search(rf"<!-- plugin example: {re.escape(name)} -->\n```\w*\n(.*?)```", page, re.DOTALL)
    assert match, f"docs/extending.md has no plugin example {name}"
    return match.group(1)


def write_example(directory: Path) -> None:
    (directory / "my_task.py").write_text(docs_example("my_task.py"))
    (directory / "my_conf" / "task").mkdir(parents=True)
    (directory / "my_conf" / "task" / "lines.yaml").write_text(docs_example("my_conf/task/lines.yaml"))


def run(directory: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "runners" / "run.py"), *args], cwd=directory,
                          capture_output=True, text=True, timeout=600, env={**os.environ, **env})


def test_the_docs_plugin_example_runs_from_its_own_folder(tmp_path):
    write_example(tmp_path)
    result = run(tmp_path, f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "task=lines", "mode=tiny",
                 "progress=false", f"hydra.run.dir={tmp_path / 'run'}", METAPEFT_PLUGINS="my_task")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["evaluation"]["metric"] == "mse"
    assert "support_mean" in metrics["evaluation"]["shots"]["5"]["baselines"]


def test_an_installed_distribution_registers_through_its_entry_point(tmp_path):
    site = tmp_path / "site"
    write_example(site.parent)
    site.mkdir()
    (tmp_path / "my_task.py").rename(site / "my_task.py")
    info = site / "my_lines-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-lines\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[metapeft.plugins]\nlines = my_task\n")
    check = ("from metapeft.config import register_configs; from metapeft.registry import TASKS; "
             "register_configs(); print('lines' in TASKS.names())")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(site)})
    assert result.stdout.strip() == "True", result.stderr[-2000:]


def test_a_plugin_that_does_not_import_is_named(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('not today')\n")
    result = run(tmp_path, "--cfg", "job", METAPEFT_PLUGINS="broken")
    assert result.returncode == 2
    assert "METAPEFT_PLUGINS: module 'broken' failed to import (RuntimeError: not today)" in result.stderr
