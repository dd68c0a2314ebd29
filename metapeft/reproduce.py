"""Re-run a published headline comparison from a fresh cache and say whether it lands inside the published interval.

A headline is a command (a sweep over seeds), the figure it reports (a column of the meta_learn table at one K) and
the published mean ± 95% CI over those seeds. ``reproduce`` runs the command again into a new sweep directory with a
new, empty cache (``METAPEFT_CACHE_DIR``: every pretrained backbone is trained anew), reads the same figure from the
new runs and compares: the reproduction agrees when its mean lies inside the published interval. The runs stay in
the sweep directory for a closer look (``runners/meta_learn_table.py`` prints their whole table).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from metapeft.meta_learn_report import columns, interval, load_runs
from metapeft.stats import Interval


@dataclass(frozen=True)
class Headline:
    overrides: tuple[str, ...]  # the sweep, without its seeds
    seeds: tuple[int, ...]
    k: str  # the K whose row holds the figure
    column: str  # the meta_learn table's column
    mean: float  # published: mean and 95% CI half-width over the seeds
    ci95: float
    page: str  # where it is published


HEADLINES = {
    # python runners/run.py experiment=low_rank_study seed=0,1,2,3,4 (docs/results/what-the-outer-loop-learns.md)
    "low_rank_study": Headline(("experiment=low_rank_study",), (0, 1, 2, 3, 4), "100", "meta_learn=both",
                               mean=0.017010, ci95=0.000922, page="docs/results/what-the-outer-loop-learns.md"),
}


def run_sweep(headline: Headline, seeds: tuple[int, ...], sweep_dir: Path, extra: list[str],
              cache_dir: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "metapeft.cli.run", "--multirun", *headline.overrides,
               f"seed={','.join(map(str, seeds))}", f"hydra.sweep.dir={sweep_dir}", "progress=false", *extra]
    return subprocess.run(command, env={**os.environ, "METAPEFT_CACHE_DIR": str(cache_dir)}, text=True,
                          capture_output=True)


def reproduced(headline: Headline, sweep_dir: Path) -> Interval:
    _, rows = columns(load_runs([sweep_dir]))
    row = next(r for r in rows if r["K"] == headline.k)
    return interval(row["values"][headline.column], row["sources"])


def verdict(headline: Headline, figure: Interval) -> tuple[bool, str]:
    inside = abs(figure.mean - headline.mean) <= headline.ci95
    seeds = f"{figure.num_seeds} seed{'s' if figure.num_seeds > 1 else ''}"
    return inside, (f"{headline.column} at K={headline.k}: published {headline.mean:.5f} ± {headline.ci95:.5f} "
                    f"({len(headline.seeds)} seeds, {headline.page}); reproduced {figure.mean:.5f} ± "
                    f"{figure.ci95:.5f} ({seeds}): {'inside' if inside else 'outside'} the published interval")


def reproduce(name: str, sweep_dir: Path, seeds: tuple[int, ...] | None = None,
              extra: list[str] = ()) -> tuple[bool, str]:
    """Run headline ``name`` again from an empty cache into ``sweep_dir``; (agrees, the line that says so)."""
    headline = HEADLINES[name]
    with tempfile.TemporaryDirectory(prefix="metapeft-reproduce-cache-") as cache:
        done = run_sweep(headline, seeds or headline.seeds, sweep_dir, list(extra), Path(cache))
    if done.returncode != 0:
        raise RuntimeError(f"the sweep failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return verdict(headline, reproduced(headline, sweep_dir))
