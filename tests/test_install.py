"""Installed without -e, the package carries its configs and commands: a wheel of this checkout, installed into a
fresh virtual environment, runs a tiny job and the docs' API example from a directory outside the checkout."""
from __future__ import annotations

import json
import os
import re
import site
import subprocess
import sys
import venv

import pytest

from helpers import REPO


@pytest.mark.slow
def test_a_non_editable_install_runs_from_anywhere(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w",
                    str(wheels), str(REPO)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = wheels.glob("metapeft-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)  # pip from the interpreter's bundled wheel: nothing downloaded
    python, bin_dir = env_dir / "bin" / "python", env_dir / "bin"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True)
    target = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            check=True, capture_output=True, text=True).stdout.strip()
    # the dependencies come from this environment's site-packages (no .pth runs from PYTHONPATH, so this
    # checkout's editable install stays out); metapeft itself comes from the wheel
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(site.getsitepackages()), "METAPEFT_CACHE_DIR": str(tmp_path)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import metapeft; print(metapeft.__file__)"], env=env, cwd=elsewhere,
                           check=True, capture_output=True, text=True).stdout
    assert where.startswith(target) and str(REPO) not in where
    result = subprocess.run([str(bin_dir / "metapeft-run"), "mode=tiny", "shots.eval=[5]", "progress=false",
                             "hydra.run.dir=run"], env=env, cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((elsewhere / "run" / "metrics.json").read_text())["status"] == "completed"
    example = re.search(r"<!-- runnable -->\s*```python\n(.*?)```",
                        (REPO / "docs" / "guides" / "checkpoints-api-export.md").read_text(), re.S).group(1)
    api = subprocess.run([str(python), "-c", f"run_dir = 'run'\n{example}"], env=env, cwd=elsewhere,
                         capture_output=True, text=True, timeout=300)
    assert api.returncode == 0 and "query MSE" in api.stdout, api.stderr[-3000:]
    usage = subprocess.run([str(bin_dir / "metapeft-run"), "--help"], env=env, cwd=elsewhere, capture_output=True,
                           text=True, timeout=120).stdout
    assert "metapeft-run --multirun" in usage and "metapeft-aggregate SWEEP_DIR" in usage
    assert "runners/" not in usage  # the installed command names itself, not a checkout's script
