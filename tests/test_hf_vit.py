"""model=hf_vit: a Hugging Face ViT read from a folder, checked against transformers' ViTModel (its stored outputs on
a small random checkpoint, tests/fixtures/make_vit_reference.py, and live where transformers is installed), meta-
trained on a miniImageNet-layout folder, and exported as an adapter Hugging Face peft loads."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from helpers import mini_imagenet_folder, run_cli
from metapeft.build import build
from metapeft.errors import ConfigError
from metapeft.models.hf_vit import HFViT, HFViTConfig

FIXTURES = Path(__file__).parent / "fixtures"
TINY_VIT = FIXTURES / "tiny_vit"
REFERENCE = json.loads((FIXTURES / "tiny_vit_reference.json").read_text())


def tiny_vit(pooling: str = "cls", path: Path = TINY_VIT) -> tuple[HFViT, dict]:
    model = HFViT(HFViTConfig(path=str(path), pooling=pooling), (16, 16, 3), 5)
    return model, model.pretrained(mx.random.key(0), 5)[0]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("name", ["tiny_vit", "tiny_vit_classifier"])
def test_matches_transformers_vit_model_on_its_stored_outputs(name, pooling):
    """Two random configurations (the second saved by ViTForImageClassification, under "vit.", with another
    LayerNorm epsilon, patch size and depth), transformers' outputs stored by tests/fixtures/make_vit_reference.py."""
    reference = json.loads((FIXTURES / f"{name}_reference.json").read_text())
    images = np.array(reference["images_channels_last"], np.float32)
    model = HFViT(HFViTConfig(path=str(FIXTURES / name), pooling=pooling), images.shape[1:], 5)
    params = model.pretrained(mx.random.key(0), 5)[0]
    hidden = np.array(reference["last_hidden_state"], np.float32)
    expected = hidden[:, 0] if pooling == "cls" else hidden[:, 1:].mean(axis=1)
    np.testing.assert_allclose(np.array(model.features(params, mx.array(images))), expected, atol=2e-5)
    assert np.abs(expected).max() > 0.5  # random weights of size 0.3: every layer moves the output


def test_matches_transformers_live_where_installed(tmp_path):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")
    config = transformers.ViTConfig(hidden_size=24, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40,
                                    image_size=12, patch_size=3, num_channels=3, layer_norm_eps=1e-6)
    torch.manual_seed(1)
    reference = transformers.ViTForImageClassification(config).eval()  # saved with the "vit." prefix
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_(0.0, 0.3)
    reference.save_pretrained(tmp_path)
    images = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        hidden = reference.vit(pixel_values=images).last_hidden_state[:, 0].numpy()
    model = HFViT(HFViTConfig(path=str(tmp_path)), (12, 12, 3), 5)
    params = model.pretrained(mx.random.key(0), 5)[0]
    ours = model.features(params, mx.array(images.permute(0, 2, 3, 1).numpy()))
    np.testing.assert_allclose(np.array(ours), hidden, atol=5e-5)


def test_hugging_face_names_round_trip_bit_for_bit():
    model, params = tiny_vit()
    stored = mx.load(str(TINY_VIT / "model.safetensors"))
    written = model.hf_state_dict(params)
    assert set(written) == set(stored)
    for name, value in stored.items():
        assert written[name].shape == value.shape and mx.array_equal(written[name], value).item(), name


def test_lora_targets_query_and_value_by_peft_names_and_starts_at_the_backbone():
    from metapeft.peft.lora import LoRA, LoRAConfig

    model, params = tiny_vit()
    lora = LoRA(LoRAConfig(rank=2, target_modules=["query", "value"]), model)
    lora.check(params)
    adapted = lora.init_adapted(params, mx.random.key(1), None)
    images = mx.array(np.array(REFERENCE["images_channels_last"], np.float32))
    frozen = lora.frozen(params)
    assert mx.array_equal(lora.features(adapted, frozen, images), model.features(params, images)).item()
    targeted = sorted(name for name in lora.low_rank_factors(adapted, frozen))
    assert targeted == [f"encoder.layer.{i}.attention.attention.{n}" for i in (0, 1) for n in ("query", "value")]


def test_an_image_size_other_than_the_checkpoints_is_refused_naming_task_image_size():
    with pytest.raises(ConfigError, match="task.image_size=16") as error:
        HFViT(HFViTConfig(path=str(TINY_VIT)), (84, 84, 3), 5)
    assert error.value.key == "task.image_size"
    with pytest.raises(ConfigError, match="colour-image task"):
        HFViT(HFViTConfig(path=str(TINY_VIT)), (8, 8), 5)


def test_a_folder_that_is_not_a_vit_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="lacks model.safetensors"):
        shutil.copy(TINY_VIT / "config.json", tmp_path / "config.json")
        HFViT(HFViTConfig(path=str(tmp_path)), (16, 16, 3), 5)
    config = json.loads((TINY_VIT / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    shutil.copy(TINY_VIT / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match="'bert' model; model=hf_vit reads model_type 'vit'"):
        HFViT(HFViTConfig(path=str(tmp_path)), (16, 16, 3), 5)
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 24}))
    with pytest.raises(ConfigError, match="has shape"):
        HFViT(HFViTConfig(path=str(tmp_path)), (16, 16, 3), 5).pretrained(mx.random.key(0), 5)


def test_a_given_normalization_replaces_the_meta_train_statistics(compose_cfg, tmp_path):
    root = mini_imagenet_folder(tmp_path / "mini", classes=(3, 3, 3), per_class=4, size=16)
    common = ("task=mini_imagenet", f"task.root={root}", "task.image_size=16", "task.num_query=1", "model=conv4",
              "task.n_way=3", "shots.train=1", "shots.eval=[1]", f"task.cache_dir={tmp_path / 'cache'}")
    task = build(compose_cfg(*common, "task.channel_mean=[0.5,0.5,0.5]", "task.channel_std=[0.5,0.5,0.5]")).task
    images = task.class_images["test"][0][:2]
    np.testing.assert_allclose(task.normalized(images), images / 127.5 - 1.0, atol=1e-6)
    with pytest.raises(ConfigError, match="both task.channel_mean and task.channel_std") as error:
        build(compose_cfg(*common, "task.channel_mean=[0.5,0.5,0.5]"))
    assert error.value.key == "task.channel_std"


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory) -> Path:
    """A tiny meta-trained LoRA run of the tiny ViT on a miniImageNet-layout folder (ProtoNet over a meta-learned
    backbone and LoRA, P>M>F's composition)."""
    tmp = tmp_path_factory.mktemp("vit")
    root = mini_imagenet_folder(tmp / "mini", classes=(5, 5, 5), per_class=4, size=16)
    run_dir = tmp / "run"
    result = run_cli("task=mini_imagenet", f"task.root={root}", "task.image_size=16", "task.num_query=1",
                     f"task.cache_dir={tmp / 'cache'}", "model=hf_vit", f"model.path={TINY_VIT}", "peft=lora",
                     "peft.target_modules=[query,value]", "algorithm=maml", "mode=tiny", "shots.train=1",
                     "shots.eval=[1]", "baselines=[linear_probe]", "progress=false", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_a_vit_meta_trains_on_a_mini_imagenet_folder_and_exports_an_adapter(vit_run, tmp_path):
    from metapeft.api import load_run
    from runners.export import main as export_main

    metrics = json.loads((vit_run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and "linear_probe" in metrics["evaluation"]["shots"]["1"]["baselines"]
    assert export_main([str(vit_run), "--out", str(tmp_path / "adapter")]) == 0
    tensors = mx.load(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    module = "base_model.model." + HFViT.hf_module_name("encoder.layer.0.attention.attention.query")
    rank = load_run(vit_run).experiment.cfg.peft.rank
    assert module.endswith(("layers.0.attention.q_proj", "encoder.layer.0.attention.attention.query"))
    assert tensors[f"{module}.lora_A.weight"].shape == (rank, 16)
    assert tensors[f"{module}.lora_B.weight"].shape == (16, rank)


def test_an_exported_vit_adapter_loads_in_hugging_face_peft(vit_run, tmp_path):
    torch = pytest.importorskip("torch", reason="peft needs torch, not installed here")
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")
    peft = pytest.importorskip("peft", reason="Hugging Face peft is not installed")
    from metapeft.api import load_run
    from runners.export import main as export_main

    assert export_main([str(vit_run), "--out", str(tmp_path / "adapter")]) == 0
    learned = load_run(vit_run)
    base = transformers.ViTModel.from_pretrained(str(TINY_VIT), add_pooling_layer=False)
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    images = np.array(REFERENCE["images_channels_last"], np.float32)
    with torch.no_grad():
        hidden = model(pixel_values=torch.tensor(images).permute(0, 3, 1, 2)).last_hidden_state[:, 0].numpy()
    x = mx.array(images)
    ours = np.array(learned.experiment.peft.features(learned.meta["weights"], learned.frozen, x))
    np.testing.assert_allclose(hidden, ours, atol=1e-4)
    backbone = learned.experiment.model.features(learned.experiment.model.pretrained(mx.random.key(0), 5)[0], x)
    assert np.abs(ours - np.array(backbone)).max() > 1e-4  # the meta-learned update is not zero: a real check


def test_a_merged_vit_export_reloads_as_the_adapted_model(vit_run, tmp_path):
    from metapeft.api import load_run
    from runners.export import main as export_main

    assert export_main([str(vit_run), "--merge", "--out", str(tmp_path / "merged")]) == 0
    learned = load_run(vit_run)
    merged, params = tiny_vit(path=tmp_path / "merged")
    x = mx.array(np.array(REFERENCE["images_channels_last"], np.float32))
    adapted = learned.experiment.peft.features(learned.meta["weights"], learned.frozen, x)
    np.testing.assert_allclose(np.array(merged.features(params, x)), np.array(adapted), atol=1e-5)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_prompt_and_prefix_tuning_run_on_the_vit_and_change_its_output(method):
    """Prompts after [CLS] (VPT-shallow) and prefixes in every layer are attended to, so [CLS] moves."""
    from metapeft.peft.prefix_tuning import PrefixTuning, PrefixTuningConfig
    from metapeft.peft.prompt_tuning import PromptTuning, PromptTuningConfig

    model, params = tiny_vit()
    peft = (PromptTuning(PromptTuningConfig(), model) if method == "prompt_tuning"
            else PrefixTuning(PrefixTuningConfig(), model))
    images = mx.array(np.array(REFERENCE["images_channels_last"], np.float32))
    adapted = peft.init_adapted(params, mx.random.key(1), images)
    features = np.array(peft.features(adapted, peft.frozen(params), images))
    assert features.shape == (3, 16) and np.isfinite(features).all()
    assert np.abs(features - np.array(model.features(params, images))).max() > 1e-3
