"""The sinusoid paper protocol (task.protocol=maml_paper): what MAML's reference code and the Meta-SGD paper did."""
from __future__ import annotations

import numpy as np
import pytest
from hydra.errors import ConfigCompositionException

from metapeft.backend import mx, utils
from metapeft.build import build, initial_state

PAPER = ["task=sinusoid", "task.protocol=maml_paper", "mode=tiny"]


def test_the_paper_protocol_sets_query_points_initialization_and_metasgd_rates(compose_cfg):
    cfg = compose_cfg(*PAPER, "algorithm=metasgd", "shots=20shot")
    assert cfg.model.init == "maml_reference" and list(cfg.algorithm.init_lr_range) == [0.005, 0.1]
    exp = build(cfg)
    episodes = exp.task.sample("test", 4, 20, np.random.default_rng(0))
    assert episodes.xs.shape == episodes.xq.shape == (4, 20, 1)  # K query points, not task.num_query
    mx.random.seed(cfg.seed)
    state = initial_state(exp)
    hidden = np.array(state.plain["hidden"][0]["weight"])
    assert abs(hidden.std() - 0.0088) < 0.002  # N(0, 0.01^2) truncated at 2 sd has sd 0.0088
    assert np.abs(hidden).max() <= 0.02 and not np.array(state.plain["hidden"][0]["bias"]).any()
    meta = exp.learner.meta_parameters(state.adapted)
    rates = np.concatenate([np.array(r).ravel() for _, r in utils.tree_flatten(meta["lr"])])
    assert 0.005 <= rates.min() and rates.max() <= 0.1 and rates.std() > 0.02  # U[0.005, 0.1], sd 0.027


def test_the_project_protocol_keeps_its_defaults_and_overrides_still_win(compose_cfg):
    project = compose_cfg("task=sinusoid", "algorithm=metasgd", "mode=tiny")
    assert project.model.init == "pytorch" and project.algorithm.init_lr_range is None
    exp = build(project)
    assert exp.task.sample("test", 2, 5, np.random.default_rng(0)).xq.shape == (2, 10, 1)
    mixed = compose_cfg(*PAPER, "algorithm=metasgd", "model.init=pytorch", "algorithm.init_lr_range=null")
    assert mixed.model.init == "pytorch" and mixed.algorithm.init_lr_range is None
    assert compose_cfg("task=digits", "algorithm=metasgd", "mode=tiny").model.init == "pytorch"


def test_an_unknown_protocol_is_refused_naming_the_valid_ones(compose_cfg):
    with pytest.raises(ConfigCompositionException, match="task.protocol") as error:
        compose_cfg("task=sinusoid", "task.protocol=reptile_paper")
    assert "maml_paper" in str(error.value.__cause__) and "project" in str(error.value.__cause__)


def test_the_paper_table_experiment_sweeps_both_algorithms_shots_and_protocols(compose_cfg):
    cfg = compose_cfg("experiment=metasgd_paper_table", return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params.algorithm == "maml,metasgd" and params.shots == "5shot,10shot,20shot"
    assert params["task.protocol"] == "maml_paper,project"
    assert cfg.task.name == "sinusoid" and cfg.evaluation.num_inner_steps == 1
    twenty = compose_cfg("experiment=metasgd_paper_table", "shots=20shot")
    assert list(twenty.shots.eval) == [20]
