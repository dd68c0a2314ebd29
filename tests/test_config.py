"""Config composition, and bad input caught before any training, naming the key."""
from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from metapeft.errors import ConfigError
from metapeft.experiment import build


def test_defaults_compose(compose_cfg):
    cfg = compose_cfg()
    assert (cfg.algorithm.name, cfg.peft.name, cfg.shots.name, cfg.mode.name, cfg.task.name, cfg.model.name) == (
        "maml", "none", "5shot", "quick", "sinusoid", "mlp")
    assert cfg.algorithm.inner_lr == cfg.task.default_inner_lr == 0.01
    assert list(cfg.shots.eval) == [1, 5, 10]


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "metasgd"])
@pytest.mark.parametrize("task", ["sinusoid", "digits"])
def test_every_algorithm_builds_on_every_task(compose_cfg, algorithm, task):
    exp = build(compose_cfg(f"algorithm={algorithm}", f"task={task}"))
    assert exp.learner.cfg.name == algorithm


def test_command_line_overrides_reach_the_groups(compose_cfg):
    cfg = compose_cfg("algorithm=metasgd", "task=sinusoid", "shots=10shot", "mode=full",
                      "algorithm.inner_lr=0.02", "seed=3")
    assert cfg.algorithm.inner_lr == 0.02 and cfg.algorithm.init_lr == 0.02
    assert cfg.shots.train == 10 and cfg.seed == 3 and cfg.mode.num_eval_tasks >= 100
    cfg = compose_cfg("task=digits", "algorithm=reptile", "algorithm.outer_lr_final=0.1")
    assert cfg.algorithm.inner_lr == 0.5 and cfg.algorithm.outer_lr_final == 0.1


def test_unknown_group_option_lists_the_valid_ones(compose_cfg):
    with pytest.raises(ConfigCompositionException, match="maml"):
        compose_cfg("algorithm=mamll")


def test_unknown_key_is_refused(compose_cfg):
    with pytest.raises(ConfigCompositionException, match="inner_lrr"):
        compose_cfg("algorithm.inner_lrr=0.1")


def test_wrong_type_is_refused(compose_cfg):
    with pytest.raises((ConfigCompositionException, ValidationError), match="num_inner_steps"):
        compose_cfg("algorithm.num_inner_steps=many")


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["shots.train=0"], "shots.train"),
        (["shots.eval=[1,-5]"], "shots.eval"),
        (["algorithm.inner_lr=-0.1"], "algorithm.inner_lr"),
        (["algorithm.num_inner_steps=0"], "algorithm.num_inner_steps"),
        (["algorithm.outer_lr=-1"], "algorithm.outer_lr"),
        (["algorithm.meta_batch_size=0"], "algorithm.meta_batch_size"),
        (["mode.num_iterations=-1"], "mode.num_iterations"),
        (["task=digits", "task.n_way=6"], "task.n_way"),  # the meta-val split has 5 classes
        (["task=digits", "task.num_query=170", "shots=10shot"], "shots"),  # the smallest class has 177 images
        (["algorithm=reptile", "algorithm.outer_lr_final=2.0"], "algorithm.outer_lr_final"),
        (["model.hidden_sizes=[40,0]"], "model.hidden_sizes"),
        (["evaluation.curve_steps=0"], "evaluation.curve_steps"),
        (["peft=lora", "peft.rank=0"], "peft.rank"),
        (["peft=lora", "peft.rank=33"], "peft.rank"),  # attention projections are 32x32
        (["peft=lora", "peft.target_modules=[qkv]"], "peft.target_modules"),
        (["peft=adalora", "peft.target_r=9"], "peft.target_r"),  # init_r is 8
        (["peft=adalora", "peft.tinit=0.9", "peft.tfinal=0.5"], "peft.tinit"),
        (["peft=prompt_tuning", "peft.num_virtual_tokens=0"], "peft.num_virtual_tokens"),
        (["peft=prompt_tuning", "peft.init=zeros"], "peft.init"),
        (["peft=prompt_tuning", "model=mlp"], "model"),
        (["peft=lora", "pretrain.iterations=0"], "pretrain.iterations"),
    ],
)
def test_impossible_values_name_their_key(compose_cfg, overrides, key):
    with pytest.raises(ConfigError) as error:
        build(compose_cfg(*overrides))
    assert error.value.key == key
    assert key in str(error.value)


def test_group_options_are_only_the_real_ones(compose_cfg):
    """Sweeping ``algorithm='glob(*)'`` must find the four algorithms, not their schemas."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import CONF_DIR

    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        loader = GlobalHydra.instance().config_loader()
        assert loader.get_group_options("algorithm") == ["fomaml", "maml", "metasgd", "reptile"]
        assert loader.get_group_options("peft") == ["adalora", "lora", "none", "prompt_tuning"]
        assert loader.get_group_options("shots") == ["10shot", "1shot", "5shot"]
