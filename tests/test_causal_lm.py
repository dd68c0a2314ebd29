"""model=causal_lm: Llama and Qwen2 read from a folder, checked against transformers (its stored outputs on small
random checkpoints, tests/fixtures/make_causal_lm_reference.py, and live where transformers is installed), as a
few-shot text classifier under LoRA and MAML."""
from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from helpers import run_cli, text_classes, tiny_causal_lm, write_text_csv
from metapeft.errors import ConfigError
from metapeft.models.causal_lm import CausalLM, CausalLMConfig

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = json.loads((FIXTURES / "causal_lm_reference.json").read_text())


def load(directory: Path, **keys) -> tuple[CausalLM, dict]:
    model = CausalLM(CausalLMConfig(path=str(directory), **keys), None, 3)
    return model, model.pretrained(mx.random.key(0), 3)[0]


@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_qwen2", "tiny_gpt2"])
def test_matches_transformers_on_its_stored_outputs(tmp_path, kind):
    model, params = load(tiny_causal_lm(tmp_path / kind, kind))
    expected = np.array(REFERENCE[kind], np.float32)
    ours = np.array(model.hidden_states(params, mx.array(REFERENCE["input_ids"])))
    np.testing.assert_allclose(ours, expected, atol=2e-4 * np.abs(expected).max())
    assert np.abs(expected).max() > 0.5


@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_qwen2", "tiny_gpt2"])
def test_as_a_language_model_its_logits_match_transformers(tmp_path, kind):
    """The next-token logits of ``*ForCausalLM`` and ``GPT2LMHeadModel``: Llama's own lm_head, Qwen2's and GPT-2's
    tied."""
    model = CausalLM(CausalLMConfig(path=str(tiny_causal_lm(tmp_path / kind, kind))), None, None)
    params = model.pretrained(mx.random.key(0), 1)[0]
    assert "head" not in params and ("lm_head" in params) == (kind == "tiny_llama")
    expected = np.array(REFERENCE[f"{kind}_logits"], np.float32)
    ours = np.array(model(params, mx.array(REFERENCE["input_ids"])))
    np.testing.assert_allclose(ours, expected, atol=2e-4 * np.abs(expected).max())


def test_matches_transformers_live_where_installed(tmp_path):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                                      num_attention_heads=6, num_key_value_heads=3, head_dim=8, attention_bias=True,
                                      mlp_bias=True, rope_theta=1000.0, rms_norm_eps=1e-6)
    torch.manual_seed(1)
    reference = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_(0.0, 0.3)
    directory = tiny_causal_lm(tmp_path / "llama")
    reference.save_pretrained(directory)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        expected = reference.model(input_ids=ids).last_hidden_state.numpy()
    model, params = load(directory)
    ours = np.array(model.hidden_states(params, mx.array(ids.numpy())))
    np.testing.assert_allclose(ours, expected, atol=2e-4 * np.abs(expected).max())


def test_padding_leaves_each_texts_state_unchanged(tmp_path):
    directory = tiny_causal_lm(tmp_path / "llama")
    model, params = load(directory)
    texts = ["abc def", "a", "hello world again"]
    together = np.array(model.features(params, mx.array(model.tokenize(texts))))
    alone = np.concatenate([np.array(model.features(params, mx.array(model.tokenize([t])))) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert (model.tokenize(texts)[1, 2:] == -1).all() and model.tokenize(["a"])[0, 0] == 1  # right-padded; <s> first
    mean_model, _ = load(directory, pooling="mean")
    assert not np.allclose(np.array(mean_model.features(params, mx.array(model.tokenize(texts)))), together)


def test_lora_targets_peft_names_and_starts_at_the_backbone(tmp_path):
    from metapeft.peft.lora import LoRA, LoRAConfig

    model, params = load(tiny_causal_lm(tmp_path / "qwen", "tiny_qwen2"))
    lora = LoRA(LoRAConfig(rank=2, target_modules=["q_proj", "v_proj"]), model)
    lora.check(params)
    adapted, frozen = lora.init_adapted(params, mx.random.key(1), None), lora.frozen(params)
    ids = mx.array(model.tokenize(["abc", "de fg"]))
    assert mx.array_equal(lora.features(adapted, frozen, ids), model.features(params, ids)).item()
    assert sorted(lora.low_rank_factors(adapted, frozen)) == [
        f"model.layers.{i}.self_attn.{n}" for i in (0, 1) for n in ("q_proj", "v_proj")]


def test_gpt2_is_read_by_its_own_layout_and_lora_targets_its_fused_projection(tmp_path):
    from metapeft.models.causal_lm import GPT2
    from metapeft.peft.lora import LoRA, LoRAConfig

    model, params = load(tiny_causal_lm(tmp_path / "gpt2", "tiny_gpt2"))
    assert isinstance(model, GPT2) and params["h"][0]["attn"]["c_attn"]["weight"].shape == (16, 48)
    lora = LoRA(LoRAConfig(rank=2, target_modules=["c_attn"]), model)
    lora.check(params)
    adapted, frozen = lora.init_adapted(params, mx.random.key(1), None), lora.frozen(params)
    assert sorted(lora.low_rank_factors(adapted, frozen)) == ["h.0.attn.c_attn", "h.1.attn.c_attn"]
    ids = mx.array(model.tokenize(["abc", "de fg"]))
    assert mx.array_equal(lora.features(adapted, frozen, ids), model.features(params, ids)).item()


def test_maml_meta_gradient_through_the_model_matches_finite_differences(tmp_path):
    """Second-order MAML through one inner LoRA step on the tiny Llama (float64, vmapped over two tasks)."""
    from metapeft.peft.lora import LoRA, LoRAConfig
    from metapeft.trees import merge

    model, params = load(tiny_causal_lm(tmp_path / "llama"))
    lora = LoRA(LoRAConfig(rank=2, target_modules=["q_proj", "v_proj"]), model)
    to64 = lambda tree: tree_map(lambda a: a.astype(mx.float64), tree)
    frozen = to64(lora.frozen(params))
    adapted = to64(lora.init_adapted(params, mx.random.key(1), None))
    adapted = tree_map(lambda a: a + 0.1, adapted)  # B away from zero, so the inner step moves every factor
    ids = mx.array(np.random.default_rng(0).integers(0, 96, size=(2, 2, 2, 6)).astype(np.int32))
    labels = mx.array([[0, 1], [1, 0]])

    def loss(a, x, y):
        logits = lora.model(merge(frozen, a), x)
        return mx.mean(mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, y[..., None], axis=-1)[..., 0])

    def meta_loss(scale):
        def task(x, y):
            start = {**adapted, "head": {**adapted["head"], "weight": adapted["head"]["weight"] * scale}}
            inner = tree_map(lambda w, g: w - 0.5 * g, start, mx.grad(loss)(start, x[0], y))
            return loss(inner, x[1], y)

        return mx.mean(mx.vmap(task)(ids, labels))

    with mx.stream(mx.cpu):  # h = 1e-3: the fused RMSNorm is not float64-exact, so smaller steps measure rounding
        one, h = mx.array(1.0, dtype=mx.float64), 1e-3
        grad = mx.grad(meta_loss)(one).item()
        numeric = (meta_loss(one + h).item() - meta_loss(one - h).item()) / (2 * h)
    assert grad == pytest.approx(numeric, rel=1e-3)


def test_unsupported_or_incomplete_folders_are_refused_by_name(tmp_path):
    directory = tiny_causal_lm(tmp_path / "llama")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(ConfigError, match=r"'gpt_neox' model; model=causal_lm reads model types \['llama'"):
        load(directory)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").rename(directory / "elsewhere.safetensors")
    with pytest.raises(ConfigError, match="neither model.safetensors nor model.safetensors.index.json"):
        load(directory)
    (directory / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="lacks tokenizer.json") as error:
        load(directory)
    assert error.value.key == "model.path"


def test_sharded_weights_load_as_one_file(tmp_path):
    directory = tiny_causal_lm(tmp_path / "llama")
    _, whole = load(directory)
    weights = mx.load(str(directory / "model.safetensors"))
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, part in shards.items():
        mx.save_safetensors(str(directory / shard), {n: weights[n] for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: shard for shard, part in shards.items() for n in part}}))
    (directory / "model.safetensors").unlink()
    _, sharded = load(directory)
    whole, sharded = dict(tree_flatten(whole["model"])), dict(tree_flatten(sharded["model"]))
    assert whole.keys() == sharded.keys() and all(mx.array_equal(v, sharded[k]).item() for k, v in whole.items())


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_gpt2"])
def lm_run(request, tmp_path_factory) -> Path:
    """A tiny LoRA + MAML run of a causal LM as a 3-way text classifier, on a CSV of texts."""
    tmp = tmp_path_factory.mktemp(request.param)
    directory = tiny_causal_lm(tmp / "model", request.param)
    (tmp / "texts").mkdir()
    write_text_csv(tmp / "texts" / "data.csv", text_classes())
    targets = "[c_attn]" if request.param == "tiny_gpt2" else "[q_proj,v_proj]"
    result = run_cli("model=causal_lm", f"model.path={directory}", "task=text_folder", f"task.root={tmp / 'texts'}",
                     "task.n_way=3", "task.val_fraction=0.34", "task.test_fraction=0.34", "peft=lora",
                     f"peft.target_modules={targets}", "algorithm=maml", "mode=tiny", "shots.eval=[1]",
                     "baselines=[linear_probe,prototype]", "progress=false", f"hydra.run.dir={tmp / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run"


def test_a_causal_lm_meta_trains_as_a_few_shot_text_classifier(lm_run):
    metrics = json.loads((lm_run / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert set(metrics["evaluation"]["shots"]["1"]["baselines"]) >= {"linear_probe", "prototype"}


def test_a_merged_export_reloads_as_the_adapted_model(lm_run, tmp_path):
    from metapeft.api import load_run
    from runners.export import main as export_main

    assert export_main([str(lm_run), "--merge", "--out", str(tmp_path / "merged")]) == 0
    learned = load_run(lm_run)
    model = learned.experiment.model
    merged = CausalLM(CausalLMConfig(path=str(tmp_path / "merged")), None, 3)
    ids = mx.array(model.tokenize(["abc def", "ghij"]))
    adapted = learned.experiment.peft.features(learned.meta["weights"], learned.frozen, ids)
    reloaded = merged.features(merged.pretrained(mx.random.key(0), 3)[0], ids)
    np.testing.assert_allclose(np.array(reloaded), np.array(adapted), atol=1e-5)


def test_an_exported_adapter_loads_in_hugging_face_peft(lm_run, tmp_path):
    torch = pytest.importorskip("torch", reason="peft needs torch, not installed here")
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")
    peft = pytest.importorskip("peft", reason="Hugging Face peft is not installed")
    from metapeft.api import load_run
    from runners.export import main as export_main

    assert export_main([str(lm_run), "--out", str(tmp_path / "adapter")]) == 0
    learned = load_run(lm_run)
    model = learned.experiment.model
    base = transformers.AutoModelForCausalLM.from_pretrained(str(model.directory))
    lm = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = model.tokenize(["abc def", "ghij"])
    with torch.no_grad():  # right padding: each text's last real token, as ours pools it
        hidden = lm(input_ids=torch.tensor(np.maximum(ids, 0).astype(np.int64)), output_hidden_states=True
                    ).hidden_states[-1].numpy()
    last = (ids >= 0).sum(axis=1) - 1
    ours = np.array(learned.experiment.peft.features(learned.meta["weights"], learned.frozen, mx.array(ids)))
    np.testing.assert_allclose(hidden[np.arange(len(ids)), last], ours, atol=1e-4)
    plain = np.array(model.features(model.pretrained(mx.random.key(0), 3)[0], mx.array(ids)))
    assert np.abs(ours - plain).max() > 1e-4  # the meta-learned update is not zero: a real check
