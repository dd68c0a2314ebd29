"""Checkpoints reload to the same test metrics; a corrupt or mismatched checkpoint is refused, naming what differs."""
from __future__ import annotations

import pytest

from metapeft.errors import ConfigError
from metapeft.experiment import run

TINY = ["mode.num_iterations=15", "mode.val_interval=5", "mode.num_val_tasks=4", "mode.num_eval_tasks=8",
        "pretrain.iterations=20", "task=digits"]


@pytest.mark.parametrize("overrides", [["algorithm=metasgd"], ["algorithm=maml", "peft=adalora", "peft.tinit=0.1"]])
def test_evaluating_a_checkpoint_reproduces_the_run(compose_cfg, tmp_path, overrides):
    cache = f"pretrain.cache_dir={tmp_path / 'cache'}"
    trained = run(compose_cfg(*TINY, cache, *overrides), tmp_path / "run")
    reloaded = run(compose_cfg(*TINY, cache, *overrides, "train=false",
                               f"checkpoint={tmp_path / 'run' / 'checkpoint'}"), tmp_path / "eval")
    assert reloaded["evaluation"] == trained["evaluation"]
    assert reloaded["train"]["final_val_metric"] == trained["train"]["final_val_metric"]
    assert reloaded["peft"] == trained["peft"]


def test_bad_checkpoints_are_refused(compose_cfg, tmp_path):
    cache = f"pretrain.cache_dir={tmp_path / 'cache'}"
    run(compose_cfg(*TINY, cache, "peft=lora"), tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoint"

    with pytest.raises(ConfigError, match="does not match the config's meta-learned tree") as error:
        run(compose_cfg(*TINY, cache, "peft=prompt_tuning", "train=false", f"checkpoint={checkpoint}"),
            tmp_path / "other_method")
    assert error.value.key == "checkpoint" and "missing" in str(error.value)
    with pytest.raises(ConfigError, match=r"checkpoint \(\d+, \d+\)"):
        run(compose_cfg(*TINY, cache, "peft=lora", "peft.rank=2", "train=false", f"checkpoint={checkpoint}"),
            tmp_path / "other_rank")

    data = (checkpoint / "meta.safetensors").read_bytes()
    (checkpoint / "meta.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="truncated or corrupt"):
        run(compose_cfg(*TINY, cache, "peft=lora", "train=false", f"checkpoint={checkpoint}"), tmp_path / "cut")

    with pytest.raises(ConfigError, match="train=false evaluates a saved run"):
        run(compose_cfg(*TINY, "train=false"), tmp_path / "nothing")
