"""Cross-task transfer: the matrix of gains with CIs, the similarity-guided choice, and bad regions refused early."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hydra.errors import ConfigCompositionException

from helpers import compose_config
from metapeft.build import build
from metapeft.errors import ConfigError
from metapeft.transfer import region_configs, transfer_study

SHORT = ["mode.num_iterations=300", "mode.num_eval_tasks=40"]


def study_config(*overrides):
    return compose_config(*SHORT, *overrides, config_name="transfer_study")


def test_sinusoid_amplitude_transfer(tmp_path):
    result = transfer_study(study_config(), tmp_path)
    assert json.loads((tmp_path / "transfer.json").read_text())["matrix"] == result["matrix"]
    assert (tmp_path / "transfer.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "sources").iterdir()) == ["high_amplitude", "low_amplitude"]
    cells = {(c["source"], c["target"]): c for c in result["matrix"]}
    assert len(cells) == 4 and all(np.isfinite(c["gain"]) and c["gain_ci95"] > 0 for c in cells.values())
    # MSE: the gain is plain_init minus meta-learned, so positive means the meta-learned start is better.
    low_to_high = cells["low_amplitude", "high_amplitude"]
    assert low_to_high["gain"] == pytest.approx(low_to_high["plain_init"]["mean"] - low_to_high["meta_learned"]["mean"])
    assert low_to_high["gain"] - low_to_high["gain_ci95"] > 0
    guided = result["guided_choice"]
    assert guided["chosen_own_region"] > 0.6  # the output spread tells amplitudes apart
    assert sum(sum(c.values()) for c in guided["choices"].values()) == 2 * 40


def test_digit_regions_hold_only_their_digits():
    cfg = study_config("transfer=digits_by_digit")
    tasks = {name: build(region).task for name, region in region_configs(cfg).items()}
    names = {name: {digit for split in task.class_names.values() for digit, _ in split} for name, task in tasks.items()}
    assert names == {"digits_0_4": {0, 1, 2, 3, 4}, "digits_5_9": {5, 6, 7, 8, 9}}


@pytest.mark.parametrize("override, key", [
    ("+transfer.regions.low_amplitude.amplitude_maximum=3", "transfer.regions.low_amplitude.amplitude_maximum"),
    ("~transfer.regions.high_amplitude", "transfer.regions"),
])
def test_bad_studies_are_refused_before_training(tmp_path, override, key):
    with pytest.raises(ConfigError) as error:
        transfer_study(study_config(override), tmp_path)
    assert error.value.key == key
    assert not (tmp_path / "sources").exists()


def test_an_unknown_embedding_is_refused_at_composition():
    with pytest.raises(ConfigCompositionException) as error:
        study_config("transfer.embedding=pixels")
    assert "embedding" in f"{error.value} {error.value.__cause__}" and "fisher" in str(error.value.__cause__)


def test_a_region_that_cannot_make_tasks_is_refused_before_training(tmp_path):
    cfg = study_config("transfer=digits_by_digit", "task.n_way=5")
    with pytest.raises(ConfigError, match="5-way needs at least 5 classes") as error:
        transfer_study(cfg, tmp_path)
    assert error.value.key == "task.n_way" and not (tmp_path / "sources").exists()
