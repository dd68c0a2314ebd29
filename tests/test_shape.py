"""The codebase's shape: no import circle, imports that load nothing heavy, and a new algorithm that needs nothing
but its own file and YAML."""
from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

from helpers import REPO, compose_config
from metapeft.algorithms.base import AlgorithmConfig, sgd_step
from metapeft.algorithms.maml import MAML
from metapeft.backend import mx
from metapeft.build import build
from metapeft.experiment import run
from metapeft.registry import ALGORITHMS


def metapeft_imports() -> dict[str, set[str]]:
    """module -> the metapeft modules it imports (at any depth of its body), read from the source."""
    graph = {}
    for path in (REPO / "metapeft").rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("metapeft"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)  # `from metapeft import io`
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("metapeft"))
        graph[module] = found
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_import_circle():
    graph = metapeft_imports()
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for dependency in sorted(graph[module]):
            assert state.get(dependency) != "open", " -> ".join([*trail, module, dependency])
            if dependency not in state:
                visit(dependency, [*trail, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_importing_metapeft_loads_no_mlx_and_starts_no_thread():
    code = ("import sys, threading\n"
            "import metapeft.stats, metapeft.config, metapeft.experiment, metapeft.transfer, metapeft.report\n"
            "metapeft.config.register_configs()\n"
            "assert not [m for m in sys.modules if m.startswith('mlx')], 'MLX imported'\n"
            "assert threading.active_count() == 1, threading.enumerate()\n")
    result = python(code)
    assert result.returncode == 0, result.stderr


def test_runner_help_and_cfg_load_no_mlx():
    for flag in ("--help", "--cfg=job"):
        code = ("import runpy, sys\n"
                f"sys.argv = ['runners/run.py', '{flag}']\n"
                "try:\n    runpy.run_path('runners/run.py', run_name='__main__')\n"
                "except SystemExit:\n    pass\n"
                "print('MLX LOADED' if any(m.startswith('mlx') for m in sys.modules) else 'NO MLX')\n")
        result = python(code)
        assert result.returncode == 0 and result.stdout.strip().endswith("NO MLX"), (flag, result.stdout[-500:],
                                                                                   result.stderr[-2000:])


@dataclass
class ThrowawayConfig(AlgorithmConfig):
    name: str = "throwaway"
    inner_lr_scale: float = 0.5


class Throwaway(MAML):
    """MAML at a fraction of its inner learning rate: an algorithm defined in a test, registered like any other."""

    def inner_step(self, meta, weights, frozen, x, y):
        grads = mx.grad(self.loss_fn)(weights, frozen, x, y)
        return sgd_step(weights, grads, self.cfg.inner_lr_scale * self.cfg.inner_lr)


def test_a_new_algorithm_needs_only_its_file_and_its_yaml(tmp_path):
    ALGORITHMS.register("throwaway", ThrowawayConfig)(Throwaway)
    conf = tmp_path / "conf" / "algorithm"
    conf.mkdir(parents=True)
    (conf / "throwaway.yaml").write_text("defaults:\n  - /schema/algorithm@_here_: throwaway\n  - _self_\n")
    cfg = compose_config("algorithm=throwaway", "mode=tiny", f"hydra.searchpath=[file://{tmp_path / 'conf'}]")
    assert cfg.algorithm.inner_lr_scale == 0.5 and cfg.algorithm.inner_lr == cfg.task.default_inner_lr
    assert isinstance(build(cfg).learner, Throwaway)
    metrics = run(cfg, tmp_path / "run")
    assert metrics["status"] == "completed" and metrics["identity"]["algorithm"] == "throwaway"
    assert np.isfinite(metrics["evaluation"]["shots"]["5"]["meta_learned"]["mean"])


def test_help_lists_the_groups_a_user_chooses_from_and_what_each_sets():
    result = subprocess.run([sys.executable, "runners/run.py", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    groups = text.split("== Groups")[1].split("== Config")[0]
    assert "schema/" not in groups and "transfer:" not in groups  # internal groups, and runners/transfer.py's own
    assert "shots: 1shot, 5shot, 10shot, 20shot" in text  # in the order of K, not of the file names
    lines = {line.split(":")[0].strip(): line for line in groups.splitlines() if ":" in line}
    for group, some in (("algorithm", ("maml", "protonet")), ("task", ("digits", "sinusoid")), ("model", ("mlp",))):
        assert all(option in lines[group] for option in some), lines.get(group)
    assert "python runners/run.py --multirun" in text and "inner_lr:" in text  # usage, then the config


def test_the_runners_modules_leave_pandas_and_matplotlib_for_when_they_are_needed():
    code = ("import sys\n"
            "import metapeft.experiment, metapeft.sweep, metapeft.config\n"
            "metapeft.config.register_configs()\n"
            "heavy = [m for m in ('pandas', 'matplotlib') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    result = python(code)
    assert result.returncode == 0, result.stderr
