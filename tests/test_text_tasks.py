"""task=text_tasks on model=causal_lm: named text-to-text tasks read from JSON Lines, the language model's own head,
scores by option likelihood and by exact match (checked against a decoding loop), the in-context baseline's
inputs, meta-gradients through the language model, and the runs the framework promises on a tiny Llama and GPT-2."""
from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from helpers import compose_config, run_cli, text_tasks, tiny_causal_lm, write_jsonl
from metapeft.build import build, initial_state
from metapeft.errors import ConfigError
from metapeft.tasks.text_tasks import token_nll


def config(tmp: Path, kind: str = "tiny_llama", *overrides: str):
    model = tmp / kind
    if not model.exists():
        tiny_causal_lm(model, kind)
    data = tmp / "tasks.jsonl"
    if not data.exists():
        write_jsonl(data, text_tasks())
    return compose_config("model=causal_lm", f"model.path={model}", "task=text_tasks", f"task.path={data}",
                          "peft=lora", "mode=tiny", *overrides)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The built experiment and its starting state on the tiny Llama."""
    exp = build(config(tmp_path_factory.mktemp("llama"), "tiny_llama", "peft.target_modules=[q_proj,v_proj]"))
    return exp, initial_state(exp)


def test_tasks_not_examples_are_split_and_the_split_is_recorded(llama):
    exp, _ = llama
    split = exp.task.report()["split"]
    names = [n for s in ("train", "val", "test") for n in split[s]]
    assert sorted(names) == sorted({row["task"] for row in text_tasks()}) and len(names) == len(set(names))
    assert all(split[s] for s in ("train", "val", "test"))
    episodes, drawn = exp.task.sample_with_classes("test", 5, 2, np.random.default_rng(0))
    assert episodes.xs.shape[:3] == (5, 2, 1) and episodes.xq.shape[:2] == (5, exp.cfg.task.num_query)
    assert set(drawn.sources.ravel()) == set(range(len(split["test"])))  # each test task is one unit of the CI


def test_the_loss_is_the_answers_cross_entropy_with_the_prompt_masked(llama):
    exp, start = llama
    e = exp.task.sample("train", 1, 3, np.random.default_rng(1))
    logits = np.array(exp.model(start.backbone, e.xs[0]), np.float64)  # (K, 1, L, V)
    ids, targets = np.array(e.xs[0]), np.array(e.ys[0])
    scored = targets[..., :-1] >= 0
    for row, mask in zip(ids.reshape(-1, ids.shape[-1]), scored.reshape(-1, scored.shape[-1])):
        real = row[row >= 0]
        assert real[-1] == exp.task.eos and mask.sum() == len(real) - 1 - int(np.argmax(mask))  # answer + end
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_p, np.maximum(targets[..., :-1], 0)[..., None], -1)[..., 0]
    expected = -(picked * scored).sum() / scored.sum()
    assert float(exp.task.loss(mx.array(logits.astype(np.float32)), e.ys[0])) == pytest.approx(expected, rel=1e-5)


def test_option_accuracy_picks_the_best_mean_log_likelihood_and_counts_a_tie_wrong():
    from metapeft.tasks.text_tasks import OptionScore, TextTasks

    task = object.__new__(TextTasks)
    task.cfg = type("C", (), {"option_score": OptionScore.mean})()
    # one query, two options over a 4-token vocabulary: the answer (1) "2 3", the other (0) "1"
    targets = mx.array([[[-1, 2, 3, 0, 1], [-1, 1, 0, -1, 0]]])  # last column: answer or not; 0 is the end token
    logits = mx.zeros((1, 2, 4, 4))
    assert task.metric(logits, targets).item() == 0.0  # every option equally likely: a tie is not a win
    favour = mx.zeros((1, 2, 4, 4)).at[0, 0, 1, 2].add(5.0)  # raise "2" after the prompt in the answer
    assert task.metric(favour, targets).item() == 1.0
    against = mx.zeros((1, 2, 4, 4)).at[0, 1, 1, 1].add(5.0)
    assert task.metric(against, targets).item() == 0.0
    nll = token_nll(favour, mx.maximum(targets[..., :-1], 0))
    assert nll.shape == (1, 2, 4)


def test_exact_match_in_one_pass_agrees_with_greedy_decoding(llama):
    """The model's own greedy continuation, scored as an output, is an exact match; one token changed is not."""
    exp, start = llama
    model, params = exp.model, start.backbone
    prompt = model.encode(["abc\n"], special_tokens=True)[0]
    sequence = list(prompt)
    for _ in range(4):  # a decoding loop: the most likely next token, one at a time
        logits = model(params, mx.array([sequence]))
        sequence.append(int(mx.argmax(logits[0, -1]).item()))
    ids = np.array(sequence, dtype=np.int32)
    targets = np.full(len(ids) + 1, -1, dtype=np.int32)
    targets[len(prompt) - 1: -2] = ids[len(prompt):]
    targets[-1] = 1  # the answer
    score = lambda x, y: exp.task.metric(model(params, mx.array(x[None, None])), mx.array(y[None, None])).item()
    assert score(ids, targets) == 1.0
    for position in range(len(prompt), len(ids)):
        changed_ids, changed = ids.copy(), targets.copy()
        changed_ids[position] = changed[position - 1] = (ids[position] + 1) % 76
        assert score(changed_ids, changed) == 0.0


def test_the_in_context_inputs_put_the_support_before_each_query(llama):
    exp, _ = llama
    task = exp.task
    e = task.sample("test", 2, 3, np.random.default_rng(2))
    xs, xq, yq = np.array(e.xs), np.array(e.xq), np.array(e.yq)
    ids, targets, used = task.in_context(xs, xq, yq)
    assert (used == 3).all()
    for t in range(2):
        demos = [d[d >= 0][:-1] for d in xs[t, :, 0]]
        context = [*demos[0], *task.demo_separator] + [tok for d in demos[1:] for tok in (*d[task.leading:],
                                                                                          *task.demo_separator)]
        for q in range(xq.shape[1]):
            for o in range(xq.shape[2]):
                query = xq[t, q, o][xq[t, q, o] >= 0]
                if not len(query):  # a padding candidate stays padding
                    assert (ids[t, q, o] < 0).all()
                    continue
                real = ids[t, q, o][ids[t, q, o] >= 0]
                assert real.tolist() == [*context, *query[task.leading:]]
                scored = np.flatnonzero(targets[t, q, o, :-1] >= 0)
                assert (targets[t, q, o, scored] == ids[t, q, o, scored + 1]).all()
                assert targets[t, q, o, -1] == yq[t, q, o, -1]
                assert len(scored) == (yq[t, q, o, :-1] >= 0).sum()
    task.context_length, full = 12, task.context_length  # room for fewer demonstrations: the last ones are kept
    try:
        _, _, fewer = task.in_context(xs, xq, yq)
    finally:
        task.context_length = full
    assert (fewer < 3).all()


def test_maml_meta_gradient_through_the_language_model_matches_finite_differences(llama):
    """Second-order MAML, one inner LoRA step on the support answers, the query loss over the answer option."""
    exp, start = llama
    from metapeft.trees import merge

    to64 = lambda tree: tree_map(lambda a: a.astype(mx.float64), tree)
    frozen = to64(start.frozen)
    adapted = tree_map(lambda a: a + 0.1, to64(start.adapted))  # B away from zero: every factor moves
    e = exp.task.sample("train", 2, 2, np.random.default_rng(3))

    def loss(a, x, y):
        return exp.task.loss(exp.peft.model(merge(frozen, a), x), y)

    def meta_loss(scale):
        def task(xs, ys, xq, yq):
            begin = tree_map(lambda w: w * scale, adapted)
            inner = tree_map(lambda w, g: w - 0.5 * g, begin, mx.grad(loss)(begin, xs, ys))
            return loss(inner, xq, yq)

        return mx.mean(mx.vmap(task)(*e))

    with mx.stream(mx.cpu):  # h = 1e-3: the fused RMSNorm is not float64-exact, so smaller steps measure rounding
        one, h = mx.array(1.0, dtype=mx.float64), 1e-3
        grad = mx.grad(meta_loss)(one).item()
        numeric = (meta_loss(one + h).item() - meta_loss(one - h).item()) / (2 * h)
    assert grad == pytest.approx(numeric, rel=1e-3) and abs(grad) > 1e-4


@pytest.mark.parametrize("lines, message", [
    (['{"task": "a", "input": "x", "output": "y"}', "not json"], "line 2 is not JSON"),
    (['{"task": "a", "input": "x"}'], "line 1 lacks 'output'"),
    (['{"task": "a", "input": "x", "output": "z", "options": ["x", "y"]}'], "not among its options"),
    (['{"task": "a", "input": "x", "output": "x", "options": ["x"]}'], "at least two distinct"),
    (['{"task": "a", "input": "x", "output": "x", "options": ["x", "y"]}',
      '{"task": "a", "input": "x", "output": "x"}'],
     "mixes examples"),
    (['{"task": "a", "input": "x", "output": "y"}'], "meta-validation and meta-test each need"),
])
def test_bad_files_are_refused_by_line(tmp_path, lines, message):
    (tmp_path / "tasks.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=message):
        build(config(tmp_path))


@pytest.mark.parametrize("overrides, key, message", [
    (["shots.train=9"], "shots", "fewer than K=9 support"),
    (["algorithm=protonet"], "algorithm", "class prototypes"),
    (["algorithm=anil"], "algorithm", "output layer is the language model's"),
    (["model.max_length=3"], "model.max_length", "at least"),
])
def test_settings_that_cannot_run_are_refused_before_any_work(tmp_path, overrides, key, message):
    with pytest.raises(ConfigError, match=message) as raised:
        build(config(tmp_path, "tiny_llama", *overrides))
    assert raised.value.key == key


def test_an_encoder_is_refused_for_text_to_text_tasks(tmp_path):
    from helpers import tiny_bert

    cfg = config(tmp_path)
    bert = tiny_bert(tmp_path / "bert")
    with pytest.raises(ConfigError, match="model=causal_lm"):
        build(compose_config("model=hf_encoder", f"model.path={bert}", "task=text_tasks",
                             f"task.path={cfg.task.path}", "mode=tiny"))


RUNS = {  # what a run must complete: the list, each on the tiny Llama unless named
    "llama_lora": ("tiny_llama", ["peft=lora", "peft.target_modules=[q_proj,v_proj]"]),
    "gpt2_lora": ("tiny_gpt2", ["peft=lora", "peft.target_modules=[c_attn]"]),
    "prefix_tuning": ("tiny_llama", ["peft=prefix_tuning"]),
    "ia3_fomaml": ("tiny_llama", ["peft=ia3", "algorithm=fomaml"]),
    "meta_learn_backbone": ("tiny_llama", ["peft=lora", "algorithm.meta_learn=backbone"]),
    "dora_reptile": ("tiny_llama", ["peft=dora", "algorithm=reptile"]),
    "prompt_tuning_metasgd": ("tiny_gpt2", ["peft=prompt_tuning", "algorithm=metasgd"]),
    "lora_checkpointed_maml": ("tiny_llama", ["peft=lora", "algorithm.checkpoint_inner_steps=true",
                                              "algorithm.tasks_per_pass=1"]),
    "adalora": ("tiny_llama", ["peft=adalora"]),
    "bitfit_gpt2": ("tiny_gpt2", ["peft=bitfit"]),  # the Llama has no biases: refused there
    "meta_learn_both": ("tiny_llama", ["peft=lora", "algorithm.meta_learn=both"]),
}


@pytest.fixture(scope="module", params=sorted(RUNS))
def lm_run(request, tmp_path_factory) -> tuple[str, Path]:
    tmp = tmp_path_factory.mktemp(request.param)
    kind, overrides = RUNS[request.param]
    model = tiny_causal_lm(tmp / "model", kind)
    data = write_jsonl(tmp / "tasks.jsonl", text_tasks())
    result = run_cli("model=causal_lm", f"model.path={model}", "task=text_tasks", f"task.path={data}", "mode=tiny",
                     *overrides, "progress=false", f"hydra.run.dir={tmp / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return request.param, tmp / "run"


def test_a_text_to_text_run_reports_the_language_model_baselines_with_paired_differences(lm_run):
    name, run = lm_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    shot = metrics["evaluation"]["shots"]["1"]
    assert set(shot["baselines"]) == {"zero_shot", "in_context", "plain_init", "finetune", "multitask_finetune"}
    assert shot["baselines"]["multitask_finetune"]["retraining"]["steps"] == metrics["train"]["iterations"]
    assert shot["baselines"]["in_context"]["mean_demonstrations"] == 1.0
    assert "chosen_on_validation" in shot["baselines"]["finetune"]
    assert {"difference", "ci95"} <= set(shot["versus_best_baseline"])
    assert metrics["task"]["split"]["test"] and metrics["evaluation"]["metric"] == "accuracy"


def test_the_frozen_language_model_stays_bit_for_bit(lm_run):
    name, run = lm_run
    if name.startswith("meta_learn"):
        pytest.skip("this run meta-learns the backbone")
    from metapeft.api import load_run

    learned = load_run(run)
    model = learned.experiment.model
    original = dict(tree_flatten(model.pretrained(mx.random.key(0), 1)[0]))
    frozen = dict(tree_flatten(learned.frozen))
    shared = [k for k in original if k in frozen]
    assert shared and all(mx.array_equal(original[k], frozen[k]).item() for k in shared)


def test_a_merged_export_reloads_as_the_adapted_language_model(lm_run, tmp_path):
    name, run = lm_run
    if name not in ("llama_lora", "meta_learn_backbone"):
        pytest.skip("one merge per kind of run: LoRA alone, and LoRA over a meta-learned backbone")
    from metapeft.api import load_run
    from metapeft.models.causal_lm import CausalLM, CausalLMConfig
    from runners.export import main as export_main

    assert export_main([str(run), "--merge", "--out", str(tmp_path / "merged")]) == 0
    learned = load_run(run)
    ids = mx.array(learned.experiment.model.tokenize(["abc def", "ghij"]))
    frozen = learned.experiment.learner.task_frozen(learned.meta, learned.frozen)
    adapted = learned.experiment.peft(learned.meta["weights"], frozen, ids)
    merged = CausalLM(CausalLMConfig(path=str(tmp_path / "merged")), None, None)
    reloaded = merged(merged.pretrained(mx.random.key(0), 1)[0], ids)
    np.testing.assert_allclose(np.array(reloaded), np.array(adapted), atol=1e-5)


def test_an_exported_adapter_reproduces_the_logits_in_hugging_face_peft(lm_run, tmp_path):
    """LoRA (Llama, GPT-2), AdaLoRA, DoRA, prefix tuning and (IA)^3 loaded by peft onto AutoModelForCausalLM."""
    name, run = lm_run
    if name in ("meta_learn_backbone", "meta_learn_both", "prompt_tuning_metasgd", "lora_checkpointed_maml",
                "bitfit_gpt2"):
        pytest.skip("a meta-learned backbone is exported merged; prompt tuning has no peft export here, nor BitFit a "
                    "peft format; one LoRA export per model family")
    torch = pytest.importorskip("torch", reason="peft needs torch, not installed here")
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")
    peft = pytest.importorskip("peft", reason="Hugging Face peft is not installed")
    from metapeft.api import load_run
    from runners.export import main as export_main

    assert export_main([str(run), "--out", str(tmp_path / "adapter")]) == 0
    learned = load_run(run)
    model = learned.experiment.model
    base = transformers.AutoModelForCausalLM.from_pretrained(str(model.directory))
    lm = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = model.tokenize(["abc def", "ghij"])
    with torch.no_grad():
        logits = lm(input_ids=torch.tensor(np.maximum(ids, 0).astype(np.int64))).logits.numpy()
    ours = np.array(learned.experiment.peft(learned.meta["weights"], learned.frozen, mx.array(ids)))
    real = ids >= 0  # right padding: the padded positions' logits are nobody's
    np.testing.assert_allclose(logits[real], ours[real], atol=1e-4)
    plain = np.array(model(model.pretrained(mx.random.key(0), 1)[0], mx.array(ids)))
    assert np.abs(ours - plain)[real].max() > 1e-4  # the adapter changes the logits: a real check


@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_gpt2"])
def test_prompt_tuning_matches_hugging_face_peft(tmp_path, kind):
    """Virtual tokens before the input, taking positions 0..n-1 (peft's prompt tuning on AutoModelForCausalLM)."""
    torch = pytest.importorskip("torch", reason="peft needs torch, not installed here")
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")
    peft = pytest.importorskip("peft", reason="Hugging Face peft is not installed")
    from metapeft.models.causal_lm import CausalLM, CausalLMConfig
    from metapeft.peft.prompt_tuning import PromptTuning, PromptTuningConfig

    directory = tiny_causal_lm(tmp_path / kind, kind)
    model = CausalLM(CausalLMConfig(path=str(directory)), None, None)
    backbone = model.pretrained(mx.random.key(0), 1)[0]
    method = PromptTuning(PromptTuningConfig(num_virtual_tokens=3, init="random"), model)
    adapted = tree_map(lambda a: 20 * a, method.init_adapted(backbone, mx.random.key(1), None))
    ids = model.tokenize(["abc def", "ghij"])
    ours = np.array(method(adapted, method.frozen(backbone), mx.array(ids)))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(directory))
    lm = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    with torch.no_grad():
        lm.prompt_encoder["default"].embedding.weight.copy_(torch.tensor(np.array(adapted["prompt"])))
        logits = lm(input_ids=torch.tensor(np.maximum(ids, 0).astype(np.int64))).logits[:, 3:].numpy()
    real = ids >= 0
    np.testing.assert_allclose(logits[real], ours[real], atol=1e-4)
    assert np.abs(ours - np.array(model(backbone, mx.array(ids))))[real].max() > 1e-3


def test_standard_retraining_trains_the_adapter_on_the_meta_training_tasks_together(llama):
    """The multi-task start of ``multitask_finetune``: its loss on meta-training tasks falls, and what it kept is
    recorded."""
    from metapeft.multitask import multitask_retrained

    exp, start = llama
    cfg = exp.cfg.copy()
    cfg.mode.num_iterations, cfg.mode.val_interval, cfg.keep = 30, 10, "last"  # accuracy is flat on random weights
    retrained, facts = multitask_retrained(type(exp)(cfg, exp.task, exp.model, exp.peft, exp.learner), start.plain,
                                           start.frozen)
    batch = exp.task.sample("train", 8, 2, np.random.default_rng(9))
    loss = lambda w: float(mx.vmap(lambda x, y: exp.loss(w, start.frozen, x, y))(batch.xq, batch.yq).mean())
    assert loss(retrained) < loss(start.plain) - 0.05
    assert facts["retraining"]["steps"] == 30 and facts["retraining"]["kept_step"] == 30
