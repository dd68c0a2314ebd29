"""Checkpoints reload to the same test metrics; a corrupt or mismatched checkpoint is refused, naming what differs."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from helpers import REPO
from metapeft.checkpoint import saved_config
from metapeft.errors import ConfigError
from metapeft.experiment import run

TINY = ["mode=tiny", "pretrain.iterations=20", "task=digits"]


def evaluate_saved(compose_cfg, run_dir, out_dir, *overrides):
    """As ``python runners/run.py train=false checkpoint=RUN_DIR *overrides`` does it."""
    command_line = ["train=false", f"checkpoint={run_dir}", *overrides]
    return run(compose_cfg(*command_line), out_dir, overrides=command_line)


@pytest.mark.parametrize("overrides", [["algorithm=metasgd"],
                                       ["peft=lora", "algorithm.meta_learn=backbone", "shots.eval=[5]"],
                                       pytest.param(["algorithm=fomaml", "peft=adalora", "peft.prune_start=0.1"],
                                                    marks=pytest.mark.slow)])  # about a minute on 2 cores
def test_evaluating_a_checkpoint_reproduces_the_run(compose_cfg, tmp_path, overrides):
    cache = f"pretrain.cache_dir={tmp_path / 'cache'}"
    trained = run(compose_cfg(*TINY, cache, *overrides), tmp_path / "run")
    # Nothing repeated: the run's own config comes from its checkpoint.
    reloaded = evaluate_saved(compose_cfg, tmp_path / "run", tmp_path / "eval")
    assert reloaded["evaluation"] == trained["evaluation"]
    assert reloaded["train"]["final_val_metric"] == trained["train"]["final_val_metric"]
    assert reloaded["peft"] == trained["peft"]
    assert reloaded["identity"]["algorithm"] == trained["identity"]["algorithm"]

    fewer = evaluate_saved(compose_cfg, tmp_path / "run" / "checkpoint", tmp_path / "eval5", "shots.eval=[5]")
    assert list(fewer["evaluation"]["shots"]) == ["5"]
    assert fewer["evaluation"]["shots"]["5"] == trained["evaluation"]["shots"]["5"]


def test_bad_checkpoints_are_refused(compose_cfg, tmp_path):
    settings = f"pretrain.cache_dir={tmp_path / 'cache'}", "shots.eval=[5]"  # one K: the refusals are what is tested
    run(compose_cfg(*TINY, *settings, "peft=lora"), tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoint"

    with pytest.raises(ConfigError, match="meta-trained with peft=lora, not peft=prompt_tuning") as error:
        evaluate_saved(compose_cfg, checkpoint, tmp_path / "other_method", "peft=prompt_tuning")
    assert error.value.key == "peft"
    with pytest.raises(ConfigError, match=r"checkpoint \(\d+, \d+\)") as error:
        evaluate_saved(compose_cfg, checkpoint, tmp_path / "other_rank", "peft=lora", "peft.rank=2")
    assert error.value.key == "checkpoint"
    prompt_tuning = run(compose_cfg(*TINY, *settings, "peft=prompt_tuning"), tmp_path / "prompt")
    assert prompt_tuning["status"] == "completed"
    (tmp_path / "prompt" / "checkpoint" / "config.yaml").write_bytes((checkpoint / "config.yaml").read_bytes())
    with pytest.raises(ConfigError, match="does not match the config's meta-learned tree .*missing") as error:
        evaluate_saved(compose_cfg, tmp_path / "prompt", tmp_path / "swapped")
    assert error.value.key == "checkpoint"

    data = (checkpoint / "meta.safetensors").read_bytes()
    (checkpoint / "meta.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="truncated or corrupt"):
        evaluate_saved(compose_cfg, checkpoint, tmp_path / "cut")
    assert (tmp_path / "cut" / "metrics.json").exists() and not (tmp_path / "cut" / "checkpoint").exists()

    with pytest.raises(ConfigError, match="train=false evaluates a saved run"):
        run(compose_cfg(*TINY, "train=false"), tmp_path / "nothing")


def test_a_folder_whose_config_is_not_a_run_config_is_refused(compose_cfg, tmp_path):
    for text in ("just: text\n", "- a\n- list\n", "{unclosed: [\n"):
        (tmp_path / "checkpoint").mkdir(exist_ok=True)
        (tmp_path / "checkpoint" / "config.yaml").write_text(text)
        with pytest.raises(ConfigError, match="config.yaml") as error:
            run(compose_cfg("train=false", f"checkpoint={tmp_path}"), tmp_path / "eval",
                overrides=["train=false", f"checkpoint={tmp_path}"])
        assert error.value.key == "checkpoint"


def test_a_run_saved_before_a_schema_key_existed_still_loads_with_that_keys_default(compose_cfg, tmp_path):
    cfg = OmegaConf.to_container(compose_cfg("task=sinusoid", "algorithm=metasgd", "mode=tiny"), resolve=True)
    del cfg["model"]["init"], cfg["algorithm"]["init_lr_range"]  # as written before they were added
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    _, saved = saved_config(tmp_path)
    assert saved.model.init == "pytorch" and saved.algorithm.init_lr_range is None


def test_a_run_directory_made_by_an_older_version_evaluates_to_its_own_figures(compose_cfg, tmp_path, caplog):
    """tests/fixtures/run_f37a9f3: ``python runners/run.py mode=tiny shots.eval=[5]`` at commit f37a9f3 (before
    ``device``, ``algorithm.meta_learn``, ``mode.finetune_steps`` and others existed), as that version wrote it."""
    fixture = REPO / "tests" / "fixtures" / "run_f37a9f3"
    assert "device" not in (fixture / "checkpoint" / "config.yaml").read_text()
    reloaded = evaluate_saved(compose_cfg, fixture, tmp_path / "eval", "baselines=[]")
    then = json.loads((fixture / "metrics.json").read_text())["evaluation"]["shots"]["5"]["meta_learned"]
    assert reloaded["evaluation"]["shots"]["5"]["meta_learned"]["per_task"] == then["per_task"]
    assert "predates these keys" in caplog.text and "algorithm.meta_learn" in caplog.text


def test_a_run_saved_before_keys_existed_evaluates_with_their_defaults(compose_cfg, tmp_path, caplog):
    """An older version's run directory: its config lacks keys added since (top level, mode, algorithm); they take
    today's defaults, which reproduce the run."""
    import yaml

    cache = f"pretrain.cache_dir={tmp_path / 'cache'}"
    trained = run(compose_cfg(*TINY, cache, "peft=lora", "shots.eval=[5]"), tmp_path / "run")
    path = tmp_path / "run" / "checkpoint" / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    for section, key in (("mode", "finetune_steps"), ("mode", "pretrain_iterations"), ("algorithm", "meta_learn"),
                         ("evaluation", "finetune_meta_learned"), ("pretrain", "val_shots"),
                         ("mode", "finetune_learning_rates"), ("mode", "baseline_val_tasks")):
        del saved[section][key]
    del saved["finetune"], saved["device"]
    path.write_text(yaml.safe_dump(saved))
    reloaded = evaluate_saved(compose_cfg, tmp_path / "run", tmp_path / "eval")
    assert reloaded["evaluation"] == trained["evaluation"]
    assert "mode.finetune_steps" in caplog.text and "finetune" in caplog.text


def test_a_quick_run_saved_before_the_baselines_budget_keys_keeps_the_budget_it_ran_with():
    """Before ``mode.finetune_learning_rates`` and ``mode.baseline_val_tasks``, every mode fine-tuned from four rates
    and tuned on all of ``mode.num_val_tasks``: a saved run lacking them gets that, not today's quick budget."""
    from omegaconf import OmegaConf

    from metapeft.checkpoint import with_later_keys

    saved = OmegaConf.create({"mode": {"name": "quick", "num_iterations": 1000, "val_interval": 100,
                                       "num_val_tasks": 50, "num_eval_tasks": 100, "pretrain_iterations": 20000,
                                       "finetune_steps": [10, 25, 50, 100]},
                              "algorithm": {"name": "maml"}, "task": {"name": "digits"}, "model": {"name": "mlp"},
                              "peft": {"name": "none"}, "shots": {"name": "5shot", "train": 5}, "seed": 0})
    filled = with_later_keys(saved)
    assert list(filled.mode.finetune_learning_rates) == [0.001, 0.003, 0.01, 0.03]
    assert filled.mode.baseline_val_tasks == 50 and filled.finetune.learning_rates == [0.001, 0.003, 0.01, 0.03]
