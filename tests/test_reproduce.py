"""The reproduction check: a published headline run again from an empty cache, and its verdict."""
from __future__ import annotations

import json

import pytest

from metapeft.reproduce import HEADLINES, Headline, verdict
from metapeft.stats import Interval


def test_the_verdict_says_inside_only_when_the_reproduced_mean_is_inside_the_published_interval():
    published = Headline(("experiment=x",), (0, 1, 2), "100", "meta_learn=both", mean=0.5, ci95=0.1, page="p.md")
    inside, line = verdict(published, Interval(0.58, 0.02, 2, "", 3))
    assert inside and "inside the published interval" in line and "0.50000 ± 0.10000 (3 seeds, p.md)" in line
    inside, line = verdict(published, Interval(0.62, 0.3, 2, "", 3))
    assert not inside and "outside" in line  # a wide reproduction does not make it agree


def test_every_headline_names_its_page_and_that_page_quotes_its_figure():
    from helpers import REPO

    for headline in HEADLINES.values():
        assert f"{headline.mean:.4f} ± {headline.ci95:.4f}" in (REPO / headline.page).read_text()


@pytest.mark.slow
def test_the_low_rank_headline_runs_again_from_an_empty_cache_at_a_small_size(tmp_path, capsys):
    from metapeft.cli.reproduce import main

    small = ["mode.num_iterations=40", "mode.val_interval=20", "mode.num_val_tasks=4", "mode.num_eval_tasks=6",
             "shots.eval=[10,100]", "mode.finetune_steps=[5,10]", "pretrain.iterations=100"]
    code = main(["low_rank_study", "--seeds", "0,1", "--out", str(tmp_path / "sweep"), *small])
    line = capsys.readouterr().out
    assert code in (0, 1) and ("inside" if code == 0 else "outside") in line and "(2 seeds)" in line
    statuses = [json.loads(p.read_text())["status"] for p in (tmp_path / "sweep").glob("*/metrics.json")]
    assert statuses == ["completed"] * 8  # the arms adapter, backbone, both, lora_ml x 2 seeds
