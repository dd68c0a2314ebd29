"""The documentation's runnable examples run: every ```python block marked ``<!-- runnable -->`` in docs/ is
executed, with ``run_dir`` a tiny meta-trained sinusoid run."""
from __future__ import annotations

import re

import pytest

from helpers import REPO
from metapeft.experiment import run

RUNNABLE = re.compile(r"<!-- runnable -->\s*```python\n(.*?)```", re.S)
BLOCKS = [(path.relative_to(REPO / "docs"), index, code) for path in sorted((REPO / "docs").rglob("*.md"))
          for index, code in enumerate(RUNNABLE.findall(path.read_text()))]


def test_the_docs_have_runnable_examples():
    assert BLOCKS, "no block in docs/ is marked <!-- runnable -->"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from helpers import compose_config

    directory = tmp_path_factory.mktemp("docs_run")
    run(compose_config("mode=tiny", "shots.eval=[5]"), directory)
    return str(directory)


@pytest.mark.parametrize("page, index, code", BLOCKS, ids=[f"{page}#{index}" for page, index, _ in BLOCKS])
def test_a_runnable_docs_example_runs(page, index, code, run_dir):
    exec(compile(code, f"docs/{page} (runnable block {index})", "exec"), {"run_dir": run_dir})
