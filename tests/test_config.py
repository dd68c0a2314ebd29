"""Config composition, and bad input caught before any training, naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from helpers import CONF_DIR
from metapeft.build import build
from metapeft.errors import ConfigError


def test_defaults_compose(compose_cfg):
    cfg = compose_cfg()
    assert (cfg.algorithm.name, cfg.peft.name, cfg.shots.name, cfg.mode.name, cfg.task.name, cfg.model.name) == (
        "maml", "none", "5shot", "quick", "sinusoid", "mlp")
    assert cfg.algorithm.inner_lr == cfg.task.default_inner_lr == 0.01
    assert list(cfg.shots.eval) == [1, 5, 10]


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "metasgd", "anil"])
@pytest.mark.parametrize("task", ["sinusoid", "digits"])
def test_every_algorithm_builds_on_every_task(compose_cfg, algorithm, task):
    exp = build(compose_cfg(f"algorithm={algorithm}", f"task={task}"))
    assert exp.learner.cfg.name == algorithm


@pytest.mark.parametrize("overrides", [["algorithm=protonet"], ["algorithm=maml", "algorithm.head_init=prototypes"]])
def test_prototypes_build_for_classification_and_are_refused_for_regression(compose_cfg, overrides):
    assert build(compose_cfg(*overrides, "task=digits", "model=conv4")).learner.cfg.head_init == "prototypes"
    with pytest.raises(ConfigError) as error:
        build(compose_cfg(*overrides, "task=sinusoid"))
    # ProtoNet is blamed as the algorithm (its head_init is not a choice); Proto-MAML's head_init as the key
    assert error.value.key == ("algorithm" if "algorithm=protonet" in overrides else "algorithm.head_init")
    assert "task=sinusoid is regression" in str(error.value)


def test_command_line_overrides_reach_the_groups(compose_cfg):
    cfg = compose_cfg("algorithm=metasgd", "task=sinusoid", "shots=10shot", "mode=full",
                      "algorithm.inner_lr=0.02", "seed=3")
    assert cfg.algorithm.inner_lr == 0.02 and cfg.algorithm.init_lr == 0.02
    assert cfg.shots.train == 10 and cfg.seed == 3 and cfg.mode.num_eval_tasks >= 100
    cfg = compose_cfg("task=digits", "algorithm=reptile", "algorithm.outer_lr_final=0.1")
    assert cfg.algorithm.inner_lr == 0.5 and cfg.algorithm.outer_lr_final == 0.1


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "protonet"])
def test_the_encoder_takes_one_task_a_pass_unless_told_otherwise(compose_cfg, algorithm):
    """model=hf_encoder's default_tasks_per_pass (1: faster there, docs/performance.md) is the algorithm's default;
    other models keep the whole meta-batch in one pass (null), and the command line wins over both."""
    assert compose_cfg(f"algorithm={algorithm}", "model=hf_encoder", "task=text").algorithm.tasks_per_pass == 1
    assert compose_cfg(f"algorithm={algorithm}", "task=digits").algorithm.tasks_per_pass is None
    cfg = compose_cfg(f"algorithm={algorithm}", "model=hf_encoder", "task=text", "algorithm.tasks_per_pass=null")
    assert cfg.algorithm.tasks_per_pass is None
    cfg = compose_cfg(f"algorithm={algorithm}", "task=digits", "algorithm.tasks_per_pass=2")
    assert cfg.algorithm.tasks_per_pass == 2


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
        (["shots.eval=[5,1,5]"], "shots.eval"),  # results are keyed by K
        (["algorithm.inner_lr=-0.1"], "algorithm.inner_lr"),
        (["algorithm.num_inner_steps=0"], "algorithm.num_inner_steps"),
        (["algorithm.outer_lr=-1"], "algorithm.outer_lr"),
        (["algorithm.meta_batch_size=0"], "algorithm.meta_batch_size"),
        (["mode.num_iterations=-1"], "mode.num_iterations"),
        (["task=digits", "task.n_way=6"], "task.n_way"),  # the meta-val split has 5 classes
        (["task=digits", "task.num_query=170", "shots=10shot"], "shots"),  # the smallest class has 177 images
        (["algorithm=reptile", "algorithm.outer_lr_final=2.0"], "algorithm.outer_lr_final"),
        (["model.hidden_sizes=[40,0]"], "model.hidden_sizes"),
        (["model.hidden_sizes=[]"], "model.hidden_sizes"),  # the baselines and embeddings read hidden features
        (["evaluation.curve_steps=0"], "evaluation.curve_steps"),
        (["peft=lora", "peft.rank=0"], "peft.rank"),
        (["peft=lora", "peft.rank=33"], "peft.rank"),  # attention projections are 32x32
        (["peft=lora", "peft.target_modules=[qkv]"], "peft.target_modules"),
        (["peft=adalora", "peft.target_r=9"], "peft.target_r"),  # init_r is 8
        (["peft=adalora", "peft.prune_start=0.9", "peft.prune_end=0.5"], "peft.prune_start"),
        (["peft=prompt_tuning", "peft.num_virtual_tokens=0"], "peft.num_virtual_tokens"),
        (["peft=prompt_tuning", "model=mlp"], "model"),
        (["peft=lora", "pretrain.iterations=0"], "pretrain.iterations"),
        (["algorithm=protonet", "task=digits", "algorithm.head_init=learned"], "algorithm.head_init"),
        (["model=conv4"], "model"),  # sinusoid inputs are not images
        (["task=digits", "model=conv4", "model.channels=0"], "model.channels"),
    ],
)
def test_impossible_values_name_their_key(compose_cfg, overrides, key):
    with pytest.raises(ConfigError) as error:
        build(compose_cfg(*overrides))
    assert error.value.key == key
    assert key in str(error.value)


def test_group_options_are_the_real_ones_not_their_schemas(compose_cfg):
    """Sweeping ``algorithm='glob(*)'`` must find the algorithms, not their schemas (which live under schema/)."""
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        loader = GlobalHydra.instance().config_loader()
        assert {"fomaml", "maml", "metasgd", "reptile"} <= set(loader.get_group_options("algorithm"))
        assert {"adalora", "lora", "none", "prompt_tuning"} <= set(loader.get_group_options("peft"))
        assert {"10shot", "1shot", "5shot"} <= set(loader.get_group_options("shots"))
        assert "shots" in loader.get_group_options("schema/shots")  # the schema exists, but elsewhere
        assert "shots" not in loader.get_group_options("shots")


@pytest.mark.parametrize("overrides, key", [(["keep=best"], "keep"), (["model.activation=gelu"], "activation"),
                                            (["device=tpu"], "device"),
                                            (["peft=prompt_tuning", "peft.init=zeros"], "init")])
def test_string_choices_are_enums_checked_at_composition(compose_cfg, overrides, key):
    with pytest.raises(ConfigCompositionException) as error:
        compose_cfg(*overrides)
    assert key in f"{error.value} {error.value.__cause__}"


def test_the_optimization_direction_comes_from_the_task_and_cannot_be_contradicted(compose_cfg):
    for task, direction in (("digits", "maximize"), ("sinusoid", "minimize")):
        cfg = compose_cfg("experiment=hpo_lora", f"task={task}", return_hydra_config=True)
        assert cfg.hydra.sweeper.direction == direction
    with pytest.raises(ConfigCompositionException, match="direction"):
        compose_cfg("task=digits", "task.direction=minimize")


def test_every_group_yaml_states_only_what_its_schema_does_not(compose_cfg):
    """One place for each default: a group option's YAML sets no key to the value its dataclass already gives."""
    from omegaconf import OmegaConf

    from metapeft.registry import ALGORITHMS, MODELS, PEFT_METHODS, TASKS

    for group, registry in (("algorithm", ALGORITHMS), ("task", TASKS), ("model", MODELS), ("peft", PEFT_METHODS)):
        for name in registry.names():
            path = Path(CONF_DIR) / group / f"{name}.yaml"
            if not path.exists():
                continue
            stated = {k: v for k, v in OmegaConf.load(path).items() if k != "defaults"}
            schema = OmegaConf.structured(registry.schema(name))
            same = [k for k, v in stated.items() if k in schema and schema[k] == v]
            assert not same, f"{path}: {same} restate the defaults of {registry.schema(name).__name__}"


@pytest.mark.parametrize("overrides, key", [(["+foo=bar"], "foo"), (["peft=lora", "+peft.rnak=4"], "peft.rnak"),
                                            (["+algorithm.inner_lrr=0.1"], "algorithm.inner_lrr"), (["~seed"], "seed")])
def test_keys_added_with_plus_or_deleted_are_refused_naming_them(compose_cfg, overrides, key):
    with pytest.raises(ConfigError) as error:
        build(compose_cfg(*overrides))
    assert error.value.key == key


def test_a_gpu_where_mlx_has_none_is_refused_naming_the_key():
    from metapeft.backend import mx, use_device

    if mx.is_available(mx.gpu):
        assert use_device("gpu") == "gpu" and mx.default_device() == mx.gpu
    else:
        with pytest.raises(ConfigError) as error:
            use_device("gpu")
        assert error.value.key == "device" and "auto, cpu" in str(error.value)
    assert use_device("cpu") == "cpu" and mx.default_device() == mx.cpu
    use_device("auto")


@pytest.mark.parametrize("argument, words", [("foo=bar", "valid: algorithm, baselines"),
                                             ("algoritm=maml", "did you mean algorithm?")])
def test_a_key_that_is_no_key_of_the_config_exits_2_naming_the_closest(argument, words):
    from helpers import run_cli

    result = run_cli(argument, "--cfg", "job")
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr


def test_an_experiments_own_group_is_a_valid_key():
    """experiment=low_rank_study brings the group low_rank_arm: one arm is chosen on the command line, as the
    study's own sweep chooses them."""
    from helpers import run_cli

    result = run_cli("experiment=low_rank_study", "low_rank_arm=both", "algorithm=maml", "hydra.mode=RUN",
                     "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "name: maml" in result.stdout and "meta_learn: both" in result.stdout


def test_resume_with_nothing_to_resume_says_so(compose_cfg, tmp_path, caplog):
    import logging

    from metapeft.experiment import run

    with caplog.at_level(logging.INFO, logger="metapeft"):
        metrics = run(compose_cfg("mode=tiny", "resume=true", "shots.eval=[5]"), tmp_path)
    assert metrics["status"] == "completed" and "holds no interrupted run to go on with" in caplog.text
