"""model=hf_encoder (a Hugging Face BERT in MLX) and the text tasks: equal to the reference implementation, exact at
initialization, targeted by Hugging Face names, and refusing bad data clearly."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from helpers import REPO, run_cli, text_classes, tiny_bert, write_text_csv
from metapeft.build import build, initial_state
from metapeft.errors import ConfigError
from metapeft.models.gelu import SQRT_HALF, erf_parts, gelu
from metapeft.models.hf_encoder import HFEncoder, HFEncoderConfig, from_hf_names, to_hf_names
from metapeft.peft.targets import target_layers
from metapeft.trees import path_name

REFERENCE = json.loads((REPO / "tests" / "fixtures" / "minilm_reference.json").read_text())
needs_packaged_model = pytest.mark.skipif(importlib.util.find_spec("all_minilm_l6_v2") is None,
                                          reason='the packaged MiniLM is not installed (pip install -e ".[text]")')


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("texts")
    write_text_csv(directory / "data.csv", text_classes())
    return directory


def text_setup(compose_cfg, bert_dir, text_dir, *overrides):
    cfg = compose_cfg("model=hf_encoder", f"model.path={bert_dir}", "task=text_folder", f"task.root={text_dir}",
                      "task.n_way=3", "task.val_fraction=0.34", "task.test_fraction=0.34", *overrides)
    exp = build(cfg)
    return exp, initial_state(exp)


@needs_packaged_model
def test_minilm_matches_the_reference_implementation(tmp_path):
    model = HFEncoder(HFEncoderConfig(max_length=REFERENCE["max_length"], cache_dir=str(tmp_path)), None, 5)
    ids = model.tokenize(REFERENCE["sentences"])
    assert ids.tolist() == REFERENCE["input_ids"]
    params, _ = model.pretrained(mx.random.key(0), 5)
    pooled = np.array(model.features(params, mx.array(ids)))
    np.testing.assert_allclose(pooled, np.array(REFERENCE["mean_pooled"]), atol=1e-4, rtol=0)
    model.cfg.pooling = "cls"
    np.testing.assert_allclose(np.array(model.features(params, mx.array(ids))), np.array(REFERENCE["cls"]),
                               atol=1e-4, rtol=0)


@needs_packaged_model
def test_minilm_matches_transformers_where_installed(tmp_path):
    pytest.importorskip("torch", reason="the reference library's backend (torch) is not installed")
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")
    import torch

    model = HFEncoder(HFEncoderConfig(max_length=32, cache_dir=str(tmp_path)), None, 5)
    texts = ["Few-shot learning from a handful of examples.", "Ufaransa", "Alemanya", "日本語のテキスト"]
    reference = transformers.AutoModel.from_pretrained(str(model.directory)).eval()
    batch = transformers.AutoTokenizer.from_pretrained(str(model.directory))(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = reference(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    expected = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    params, _ = model.pretrained(mx.random.key(0), 5)
    ours = np.array(model.features(params, mx.array(model.tokenize(texts))))
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def test_fast_gelu_is_accurate_equals_the_sign_form_and_stays_finite_with_its_derivatives():
    """GELU from erf's rational form: within 2e-6 of x Phi(x); within float32 rounding of the form it replaced,
    0.5 x (1 + sign(x) erf(|x| / sqrt 2)) with |x| clamped; finite, with finite first and second derivatives, far
    out, where p^16 overflows."""
    from scipy.special import erf as reference

    x = np.linspace(-12, 12, 20001).astype(np.float32)
    exact = 0.5 * x.astype(np.float64) * (1 + reference(x.astype(np.float64) / np.sqrt(2)))
    ours = np.array(gelu(mx.array(x)))
    assert np.abs(ours - exact).max() < 2e-6
    u = mx.array(x) * SQRT_HALF
    sign_form = np.array(0.5 * mx.array(x) * (1.0 + mx.sign(u) * (1.0 - 1.0 / erf_parts(u)[2])))
    np.testing.assert_allclose(ours, sign_form, rtol=4 * np.finfo(np.float32).eps, atol=4e-7)
    far = mx.array(np.array([-1e30, -1e4, -30.0, 30.0, 1e4, 1e30], dtype=np.float32))
    np.testing.assert_array_equal(np.array(gelu(far)), np.maximum(np.array(far), 0))
    first = mx.grad(lambda u: gelu(u).sum())(far)
    second = mx.grad(lambda v: mx.grad(lambda u: gelu(u).sum())(v).sum())(far)
    assert np.isfinite(np.array(first)).all() and np.isfinite(np.array(second)).all()


def test_gelu_given_derivative_is_the_traced_one_first_and_second_order():
    """GELU's derivative is written out (``gelu_slope``); it must be the derivative autodiff traces through the same
    forward, to float64 rounding, so MAML's second-order meta-gradient is unchanged; also under vmap and past the
    clamp of erf (|x| > 6 sqrt 2)."""
    traced = gelu.forward  # the same forward, differentiated by MLX
    with mx.stream(mx.cpu):
        x = mx.array(np.concatenate([np.linspace(-12, 12, 2001), [0.0, -9.5, 9.5]])).astype(mx.float64)
        for f in (lambda v: v.sum(), lambda v: (v ** 2).sum()):
            first = [np.array(mx.grad(lambda u: f(g(u)))(x)) for g in (gelu, traced)]
            np.testing.assert_allclose(*first, rtol=1e-12, atol=1e-14)
            second = [np.array(mx.grad(lambda w: mx.grad(lambda u: f(g(u)))(w).sum())(x)) for g in (gelu, traced)]
            # at x = 0 exactly the traced second derivative is 0 (MLX's derivative of |x| there is sign(0) = 0)
            # and the given one is half the true 2 phi(0); an activation of exactly 0 is the only place they differ
            nonzero = np.array(x) != 0
            np.testing.assert_allclose(second[0][nonzero], second[1][nonzero], rtol=1e-10, atol=1e-12)
        tasks = x[:2000].reshape(4, 500)
        vmapped = [np.array(mx.vmap(mx.grad(lambda u: (g(u) ** 2).sum()))(tasks)) for g in (gelu, traced)]
        np.testing.assert_allclose(*vmapped, rtol=1e-12, atol=1e-14)
        np.testing.assert_array_equal(np.array(gelu(x)), np.array(traced(x)))  # the forward is the same computation


def test_hugging_face_names_round_trip(bert_dir):
    model = HFEncoder(HFEncoderConfig(path=str(bert_dir)), None, 2)
    tree = model.init(mx.random.key(3))
    flat = to_hf_names(tree)
    assert "encoder.layer.1.attention.self.query.weight" in flat and "embeddings.LayerNorm.weight" in flat
    assert flat["encoder.layer.0.intermediate.dense.weight"].shape == (32, 16)  # PyTorch's (out, in)
    back = from_hf_names(flat, tree, bert_dir)
    assert all(mx.array_equal(a, b).item() for (_, a), (_, b) in zip(tree_flatten(back),
                                                                     tree_flatten({k: v for k, v in tree.items()
                                                                                   if k != "head"})))


@pytest.mark.parametrize("targets, expected", [
    (["query", "value"], 4), (["attention.output.dense"], 2), (["output.dense"], 4), (["intermediate.dense"], 2),
    (["all-linear"], 12), (["encoder.layer.1.attention.self.key"], 1)])
def test_peft_targets_layers_by_hugging_face_names(bert_dir, targets, expected):
    model = HFEncoder(HFEncoderConfig(path=str(bert_dir)), None, 2)
    chosen = target_layers(model, model.init(mx.random.key(0)), targets)
    assert len(chosen) == expected
    if targets == ["attention.output.dense"]:
        assert {path_name(p) for p, _ in chosen} == {f"encoder.layer.{i}.attention.output.dense" for i in (0, 1)}


def test_padding_does_not_change_a_texts_embedding(bert_dir):
    model = HFEncoder(HFEncoderConfig(path=str(bert_dir)), None, 2)
    params = model.init(mx.random.key(1))
    ids = model.tokenize(["abc de", "a much longer text than the first one"])
    padded = np.concatenate([ids, np.zeros((2, 5), dtype=np.int32)], axis=1)
    np.testing.assert_allclose(np.array(model.features(params, mx.array(ids))),
                               np.array(model.features(params, mx.array(padded))), atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_low_rank_methods_start_exactly_at_the_encoder(compose_cfg, bert_dir, text_dir, method):
    exp, start = text_setup(compose_cfg, bert_dir, text_dir, f"peft={method}")
    x = exp.task.sample("test", 1, 2, np.random.default_rng(0)).xq[0]
    with_head = {**start.adapted, "head": start.backbone["head"]}
    assert mx.array_equal(exp.peft.features(with_head, start.frozen, x),
                          exp.model.features(start.backbone, x)).item()
    moved = {**tree_map(lambda a: a + 0.1, start.adapted), "head": start.backbone["head"]}
    assert not mx.allclose(exp.peft.features(moved, start.frozen, x), exp.model.features(start.backbone, x)).item()


def test_prompt_tuning_on_the_encoder_acts_through_attention_only(compose_cfg, bert_dir, text_dir):
    exp, start = text_setup(compose_cfg, bert_dir, text_dir, "peft=prompt_tuning")
    prompt = start.adapted["prompt"]
    assert prompt.shape == (4, 16)
    x = exp.task.sample("test", 1, 2, np.random.default_rng(0)).xq[0]
    with_prompt = exp.peft.features(start.adapted, start.frozen, x)
    assert with_prompt.shape == (15, 16)  # 3-way x 5 query texts: prompts are not pooled
    assert not mx.allclose(with_prompt, exp.model.features(start.backbone, x)).item()


def test_text_folder_reads_split_files_and_jsonl(compose_cfg, bert_dir, tmp_path):
    classes = text_classes(num_classes=9)
    names = sorted(classes)
    for split, part in zip(("train", "val", "test"), (names[:3], names[3:6], names[6:])):
        rows = [json.dumps({"sentence": t, "y": label}) for label in part for t in classes[label]]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    cfg = compose_cfg("model=hf_encoder", f"model.path={bert_dir}", "task=text_folder", f"task.root={tmp_path}",
                      "task.text_column=sentence", "task.label_column=y", "task.n_way=3")
    exp = build(cfg)
    assert exp.task.class_names == {"train": names[:3], "val": names[3:6], "test": names[6:]}
    episodes = exp.task.sample("train", 2, 1, np.random.default_rng(0))
    assert episodes.xs.dtype == mx.int32 and episodes.xs.shape[:2] == (2, 3)


@pytest.mark.parametrize("problem, key, words", [
    ("missing_column", "task.text_column", "'text' is not a column"),
    ("empty_class", "task.root", "has no non-empty text"),
    ("too_few", "shots", "exceed the"),
    ("one_text", "task.num_query", "drop that class"),
    ("shared_label", "task.root", "must be disjoint"),
])
def test_text_folder_refuses_bad_data_naming_the_key(compose_cfg, bert_dir, tmp_path, problem, key, words):
    classes = text_classes(num_classes=9)
    if problem == "missing_column":
        (tmp_path / "data.csv").write_text("sentence,label\nabc,x\n")
    elif problem == "empty_class":
        classes["class3"] = ["", "  "]
        write_text_csv(tmp_path / "data.csv", classes)
    elif problem == "too_few":
        classes["class3"] = classes["class3"][:8]  # enough for K=1, not for K=5 or 10
        write_text_csv(tmp_path / "data.csv", classes)
    elif problem == "one_text":  # no K fits it whatever shots says
        classes["class3"] = classes["class3"][:1]
        write_text_csv(tmp_path / "data.csv", classes)
    else:
        names = sorted(classes)
        for split, part in zip(("train", "val", "test"), (names[:4], names[3:6], names[6:])):
            write_text_csv(tmp_path / f"{split}.csv", {n: classes[n] for n in part})
    cfg = compose_cfg("model=hf_encoder", f"model.path={bert_dir}", "task=text_folder", f"task.root={tmp_path}",
                      "task.n_way=2", "task.val_fraction=0.34", "task.test_fraction=0.34")
    with pytest.raises(ConfigError) as error:
        build(cfg)
    assert error.value.key == key and words in str(error.value)


@pytest.mark.parametrize("overrides, words", [
    (("task=digits", "model=hf_encoder"), "use task=text, task=text_folder or task=text_tasks"),
    (("task=text_folder", "task.root=/tmp", "model=transformer", "peft=lora"), "use model=hf_encoder"),
])
def test_text_and_non_text_parts_do_not_mix(compose_cfg, bert_dir, overrides, words):
    with pytest.raises(ConfigError) as error:
        build(compose_cfg(*overrides, f"model.path={bert_dir}" if "model=hf_encoder" in overrides else "seed=0"))
    assert words in str(error.value)


def test_a_model_directory_without_its_files_is_refused(compose_cfg, tmp_path, text_dir):
    with pytest.raises(ConfigError) as error:
        build(compose_cfg("model=hf_encoder", f"model.path={tmp_path}", "task=text_folder", f"task.root={text_dir}",
                          "task.n_way=3", "task.val_fraction=0.34", "task.test_fraction=0.34"))
    assert error.value.key == "model.path" and "config.json, model.safetensors, tokenizer.json" in str(error.value)


def test_language_identification_task_is_built_from_babel(compose_cfg, bert_dir, tmp_path):
    pytest.importorskip("babel", reason='task=text reads Babel\'s CLDR data (pip install -e ".[text]")')
    exp = build(compose_cfg("model=hf_encoder", f"model.path={bert_dir}", "task=text", f"paths.cache_dir={tmp_path}"))
    names = exp.task.class_names
    assert len(names["test"]) == 50 and len(names["val"]) == 30 and len(names["train"]) >= 100
    assert not set(names["train"]) & set(names["test"]) and not set(names["val"]) & set(names["test"])
    assert {"fr", "de", "sw"} <= set(names["train"]) | set(names["val"]) | set(names["test"])
    assert all(len(c) == 100 for split in ("train", "val", "test") for c in exp.task.class_images[split])
    again = build(compose_cfg("model=hf_encoder", f"model.path={bert_dir}", "task=text", f"paths.cache_dir={tmp_path}"))
    assert again.task.class_names == names  # the cached corpus gives the same split


def test_the_runner_meta_trains_on_your_text_and_reports_baselines(bert_dir, text_dir, tmp_path):
    result = run_cli("model=hf_encoder", f"model.path={bert_dir}", "task=text_folder", f"task.root={text_dir}",
                     "task.n_way=3", "task.val_fraction=0.34", "task.test_fraction=0.34", "peft=lora", "mode=tiny",
                     "progress=false", f"hydra.run.dir={tmp_path / 'run'}", "shots.eval=[1,5]")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    five = metrics["evaluation"]["shots"]["5"]
    assert {"nearest_centroid", "logistic_regression", "prototype", "linear_probe", "plain_init"} <= set(
        five["baselines"])
    assert 0 <= five["meta_learned"]["mean"] <= 1 and five["versus_best_baseline"]["baseline"] in five["baselines"]


@pytest.fixture(scope="module")
def text_runs(bert_dir, text_dir, tmp_path_factory) -> dict[str, Path]:
    """A tiny meta-trained run per PEFT method on the tiny BERT (one sweep: one start-up), and LoRA under
    meta_learn=both."""
    common = ["model=hf_encoder", f"model.path={bert_dir}", "task=text_folder", f"task.root={text_dir}", "task.n_way=3",
              "task.val_fraction=0.34", "task.test_fraction=0.34", "mode=tiny", "shots.eval=[1]", "baselines=[]",
              "progress=false"]
    methods = ("lora", "ia3", "dora", "prefix_tuning", "bitfit")
    sweep = tmp_path_factory.mktemp("text_runs")
    result = run_cli("--multirun", *common, f"peft={','.join(methods)}", f"hydra.sweep.dir={sweep}",
                     "hydra.sweep.subdir=${peft.name}")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {method: sweep / method for method in methods}
    for name, overrides in {"adalora": ["peft=adalora", "peft.prune_end=0.5"],
                            "lora_both": ["peft=lora", "algorithm.meta_learn=both", "algorithm.backbone_outer_lr=0.01"]
                            }.items():
        runs[name] = tmp_path_factory.mktemp(f"run_{name}")
        result = run_cli(*common, *overrides, f"hydra.run.dir={runs[name]}")
        assert result.returncode == 0, result.stderr[-3000:]
    return runs


def adapted_features(learned, x):
    return np.array(learned.experiment.peft.features(learned.meta["weights"], learned.frozen, x))


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3", "dora", "prefix_tuning"])
def test_an_exported_adapter_has_peft_names_and_layouts(text_runs, tmp_path, method):
    from metapeft.api import load_run
    from runners.export import main as export_main

    assert export_main([str(text_runs[method]), "--format", "peft", "--out", str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    tensors = mx.load(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    learned = load_run(text_runs[method])
    module = "encoder.layer.0.attention.self.query"
    if method == "prefix_tuning":  # (virtual tokens, layers x (key, value) x width), as peft's PrefixTuning
        assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 4
        prefix = learned.meta["weights"]["prefix"]
        assert list(tensors) == ["prompt_embeddings"] and tensors["prompt_embeddings"].shape == (4, 2 * 2 * 16)
        assert mx.array_equal(tensors["prompt_embeddings"][:, 16:32], prefix[0, 1]).item()  # layer 0's values
    elif method == "ia3":  # keys' and values' outputs (out, 1), output.dense's inputs (1, in), as peft's IA3
        assert config["peft_type"] == "IA3" and len(config["target_modules"]) == 8
        assert set(config["feedforward_modules"]) < set(config["target_modules"])
        assert tensors["base_model.model.encoder.layer.0.attention.self.key.ia3_l"].shape == (16, 1)
        assert tensors["base_model.model.encoder.layer.0.output.dense.ia3_l"].shape == (1, 32)
    elif method == "dora":
        assert config["peft_type"] == "LORA" and config["use_dora"] and len(config["target_modules"]) == 12
        assert tensors[f"base_model.model.{module}.lora_magnitude_vector"].shape == (16,)
    elif method == "lora":
        a = tensors[f"base_model.model.{module}.lora_A.weight"]
        assert a.shape == (config["r"], 16) and tensors[f"base_model.model.{module}.lora_B.weight"].shape == (16, 4)
        assert mx.array_equal(a, learned.meta["weights"]["encoder"]["layer"][0]["attention"]["self"]["query"]
                              ["lora_a"].T).item()
    else:
        assert config["peft_type"] == "ADALORA" and len(config["target_modules"]) == 12
        assert tensors[f"base_model.model.{module}.lora_E"].shape == (config["init_r"], 1)
        masked = int((np.array(tensors[f"base_model.model.{module}.lora_E"]) == 0).sum())
        kept = learned.experiment.peft.report(learned.frozen)["final_rank_per_layer"][module]
        assert masked >= config["init_r"] - kept  # pruned triplets are exported as zeros
    assert mx.load(str(tmp_path / "adapter" / "head.safetensors"))["weight"].shape == (3, 16)


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3", "dora", "bitfit"])
def test_a_merged_model_reproduces_the_adapted_one(text_runs, tmp_path, method):
    from metapeft.api import load_run
    from runners.export import main as export_main

    assert export_main([str(text_runs[method]), "--merge", "--out", str(tmp_path / "merged")]) == 0
    learned = load_run(text_runs[method])
    merged = HFEncoder(HFEncoderConfig(path=str(tmp_path / "merged")), None, 3)
    params, _ = merged.pretrained(mx.random.key(0), 3)
    x = learned.inputs(["abc def", "ghij", "a b c d e f"], "x")
    np.testing.assert_allclose(np.array(merged.features(params, x)), adapted_features(learned, x), atol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_a_meta_learned_backbone_is_exported_merged_and_the_adapter_alone_is_refused(text_runs, tmp_path):
    from metapeft.api import load_run
    from runners.export import main as export_main

    assert export_main([str(text_runs["lora_both"]), "--out", str(tmp_path / "adapter")]) == 2
    assert not (tmp_path / "adapter").exists()  # a refused export leaves no folder behind
    assert export_main([str(text_runs["lora_both"]), "--merge", "--out", str(tmp_path / "merged")]) == 0
    learned = load_run(text_runs["lora_both"])
    merged = HFEncoder(HFEncoderConfig(path=str(tmp_path / "merged")), None, 3)
    params, _ = merged.pretrained(mx.random.key(0), 3)
    x = learned.inputs(["abc def", "ghij", "a b c d e f"], "x")
    np.testing.assert_allclose(np.array(merged.features(params, x)), adapted_features(learned, x), atol=1e-5)
    pretrained = learned.experiment.model.pretrained(mx.random.key(0), 3)[0]
    query = ("encoder", "layer", 0, "attention", "self", "query", "weight")
    moved = learned.meta["backbone"]
    for key in query:
        moved, pretrained = moved[key], pretrained[key]
    assert np.abs(np.array(moved) - np.array(pretrained)).max() > 0  # the backbone was meta-learned


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3", "dora", "prefix_tuning"])
def test_an_exported_adapter_loads_in_hugging_face_peft(text_runs, tmp_path, method):
    torch = pytest.importorskip("torch", reason="peft needs torch, not installed here")
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")
    peft = pytest.importorskip("peft", reason="Hugging Face peft is not installed")
    from metapeft.api import load_run
    from runners.export import main as export_main

    assert export_main([str(text_runs[method]), "--out", str(tmp_path / "adapter")]) == 0
    learned = load_run(text_runs[method])
    base = transformers.AutoModel.from_pretrained(str(learned.experiment.model.directory))
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    texts = ["abc def", "ghij", "a b c d e f"]
    x = learned.inputs(texts, "x")
    ids = torch.tensor(np.array(x).astype(np.int64))
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    mask = (ids != 0)[..., None].float()
    ours = adapted_features(learned, x)
    np.testing.assert_allclose(((hidden * mask).sum(1) / mask.sum(1)).numpy(), ours, atol=1e-4)
    backbone = learned.experiment.model.features(learned.experiment.model.pretrained(mx.random.key(0), 3)[0], x)
    assert np.abs(ours - np.array(backbone)).max() > 1e-3  # the meta-learned update is not zero: a real check


def test_export_refuses_a_run_it_cannot_write(text_runs, tmp_path, capsys):
    from runners.export import main as export_main

    assert export_main([str(text_runs["bitfit"]), "--out", str(tmp_path / "bitfit")]) == 2  # no peft format
    assert "--merge" in capsys.readouterr().err
    assert export_main([str(text_runs["prefix_tuning"]), "--merge", "--out", str(tmp_path / "prefix")]) == 2
    assert "without --merge" in capsys.readouterr().err
    assert not (tmp_path / "bitfit").exists() and not (tmp_path / "prefix").exists()

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert export_main([str(text_runs["lora"]), "--out", str(tmp_path / "taken")]) == 2
    assert export_main([str(text_runs["lora"]), "--out", str(tmp_path / "taken" / "file" / "below")]) == 2


def test_roberta_matches_transformers_where_installed(bert_dir, tmp_path):
    torch = pytest.importorskip("torch", reason="the reference library's backend (torch) is not installed")
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=80, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=32, max_position_embeddings=40, pad_token_id=0)
    reference = transformers.RobertaModel(config, add_pooling_layer=False).eval()
    reference.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((bert_dir / "tokenizer.json").read_bytes())
    model = HFEncoder(HFEncoderConfig(path=str(tmp_path)), None, 2)
    ids = model.tokenize(["abc def", "a much longer text", "x"])
    with torch.no_grad():
        tensor = torch.tensor(ids.astype(np.int64))
        hidden = reference(input_ids=tensor, attention_mask=(tensor != 0).long()).last_hidden_state
    mask = (tensor != 0)[..., None].float()
    params, _ = model.pretrained(mx.random.key(0), 2)
    np.testing.assert_allclose(np.array(model.features(params, mx.array(ids))),
                               ((hidden * mask).sum(1) / mask.sum(1)).numpy(), atol=1e-4)


def test_task_text_without_the_text_extra_is_refused_with_the_pip_line(monkeypatch, tmp_path):
    import sys

    from metapeft.tasks.text import corpus

    monkeypatch.setitem(sys.modules, "babel", None)  # as if the text extra were not installed
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[text\]"') as error:
        corpus(str(tmp_path))
    assert error.value.key == "task"
