"""PEFT methods: exact at initialization, meta-gradients checked against finite differences, merging, a frozen
backbone, AdaLoRA's schedule, and every algorithm x method pair."""
from __future__ import annotations

from functools import partial

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from omegaconf import OmegaConf

from metapeft.build import build, parameter_counts
from metapeft.errors import ConfigError
from metapeft.experiment import run
from metapeft.tasks.base import Episodes
from metapeft.train import MetaTraining, TrainLog, meta_train
from metapeft.trees import count, get_in, merge, paths_holding


def setup(compose_cfg, *overrides, seed=0):
    exp = build(compose_cfg("task=digits", *overrides))
    backbone = exp.model.init(mx.random.key(seed))  # a stand-in for the pretrained backbone
    inputs, _ = exp.task.pretraining_batch(np.random.default_rng(0), 64)
    return exp, backbone, exp.peft.frozen(backbone), exp.peft.init_adapted(backbone, mx.random.key(seed + 1), inputs)


def snapshot(tree):
    return {k: np.array(v) for k, v in tree_flatten(tree)}


IDENTITY_AT_START = ["lora", "adalora", "ia3", "dora", "bitfit"]  # prefix tuning has no such start (its docstring)
ALL_METHODS = ["none", *IDENTITY_AT_START, "prompt_tuning", "prefix_tuning"]


@pytest.mark.parametrize("model", ["transformer", "mlp", "conv4"])
@pytest.mark.parametrize("method", IDENTITY_AT_START)
def test_methods_start_exactly_at_the_backbone(compose_cfg, method, model):
    exp, backbone, frozen, adapted = setup(compose_cfg, f"peft={method}", f"model={model}")
    x = exp.task.sample("test", 1, 5, np.random.default_rng(0)).xq[0]
    with_backbone_head = {**adapted, "head": backbone["head"]}
    assert mx.array_equal(exp.peft(with_backbone_head, frozen, x), exp.model(backbone, x)).item()
    # ... and the adapter really is wired in: moving it (not the head) moves the output
    moved = {**tree_map(lambda a: a + 0.1, adapted), "head": backbone["head"]}
    assert not mx.allclose(exp.peft(moved, frozen, x), exp.model(backbone, x)).item()


def test_lora_works_on_the_mlp(compose_cfg):
    exp, backbone, frozen, adapted = setup(compose_cfg, "peft=lora", "model=mlp")
    assert set(adapted) == {"head", "hidden"} and set(adapted["hidden"][1]) == {"lora_a", "lora_b"}
    assert adapted["hidden"][0] == {}  # all-linear leaves out the input layer


def test_prompt_tuning_acts_only_through_its_prompt(compose_cfg):
    exp, backbone, frozen, adapted = setup(compose_cfg, "peft=prompt_tuning")
    assert set(adapted) == {"head", "prompt"} and adapted["prompt"].shape == (4, 32)
    x = exp.task.sample("test", 1, 5, np.random.default_rng(0)).xq[0]
    out = exp.peft(adapted, frozen, x)
    same = exp.model(merge(frozen, {"head": adapted["head"]}), x, prompt=adapted["prompt"])
    assert mx.array_equal(out, same).item()
    other_prompt = {**adapted, "prompt": adapted["prompt"] + 1.0}
    assert not mx.allclose(exp.peft(other_prompt, frozen, x), out).item()
    without_prompt = exp.model(merge(frozen, {"head": adapted["head"]}), x)
    assert not mx.allclose(without_prompt, out).item()


def test_ia3_rescales_keys_values_and_the_feed_forward_input_with_vectors_of_ones(compose_cfg):
    exp, backbone, frozen, adapted = setup(compose_cfg, "peft=ia3")
    layer = adapted["layers"][0]
    assert set(layer) == {"attention", "mlp"} and set(layer["attention"]) == {"key", "value"}
    assert layer["attention"]["key"]["ia3_out"].shape == (32,) and layer["mlp"]["fc2"]["ia3_in"].shape == (64,)
    assert all(np.all(np.array(v) == 1) for k, v in tree_flatten(adapted) if "ia3" in k)
    _, _, _, mlp_adapted = setup(compose_cfg, "peft=ia3", "model=mlp")
    assert mlp_adapted["hidden"][0] == {} and set(mlp_adapted["hidden"][1]) == {"ia3_out"}  # input layer left out
    with pytest.raises(ConfigError, match="peft.feedforward_modules"):
        build(compose_cfg("task=digits", "peft=ia3", "peft.target_modules=[key]", "peft.feedforward_modules=[fc2]"))
    # targets chosen, feed-forward left to its default: the default applies to the chosen targets only
    _, _, _, keys_only = setup(compose_cfg, "peft=ia3", "peft.target_modules=[key]")
    assert set(keys_only["layers"][0]) == {"attention"}
    with pytest.raises(ConfigError) as error:  # the key the user set is the one named
        build(compose_cfg("peft=ia3", "peft.target_modules=[nonexistent]"))
    assert error.value.key == "peft.target_modules"


def test_dora_starts_with_the_weights_norms_and_keeps_them_when_the_direction_moves(compose_cfg):
    exp, backbone, frozen, adapted = setup(compose_cfg, "peft=dora")
    query = adapted["layers"][0]["attention"]["query"]
    weight = backbone["layers"][0]["attention"]["query"]["weight"]
    np.testing.assert_allclose(np.array(query["dora_magnitude"]), np.linalg.norm(np.array(weight), axis=0), rtol=1e-6)
    moved = tree_map(lambda a: a + 0.1, adapted)  # B != 0: the direction changes, the magnitude is the adapter's
    merged = exp.peft.merged(moved, frozen)["layers"][0]["attention"]["query"]["weight"]
    np.testing.assert_allclose(np.linalg.norm(np.array(merged), axis=0),
                               np.array(moved["layers"][0]["attention"]["query"]["dora_magnitude"]), rtol=1e-5)


def test_bitfit_adapts_the_biases_alone(compose_cfg):
    exp, backbone, frozen, adapted = setup(compose_cfg, "peft=bitfit")
    names = [k for k, _ in tree_flatten({k: v for k, v in adapted.items() if k != "head"})]
    assert names and all(k.endswith(".bias") for k in names)
    assert "layers.0.attention_norm.bias" in names and "layers.0.mlp.fc1.bias" in names
    assert not any(k.endswith("bias") for k, _ in tree_flatten(exp.peft.learnable_backbone(frozen)))
    _, _, _, without_norms = setup(compose_cfg, "peft=bitfit", "peft.include_norms=false")
    assert not any("norm" in k for k, _ in tree_flatten(without_norms))


def test_prefix_tuning_starts_from_real_tokens_keys_and_values_and_acts_through_attention(compose_cfg):
    exp, backbone, frozen, adapted = setup(compose_cfg, "peft=prefix_tuning")
    prefix = np.array(adapted["prefix"])
    assert prefix.shape == (2, 2, 4, 32)  # layers, (keys, values), virtual tokens, width
    inputs, _ = exp.task.pretraining_batch(np.random.default_rng(0), 64)
    for layer, (keys, values) in enumerate(exp.model.token_keys_values(backbone, inputs)):
        keys, values = np.array(keys), np.array(values)
        for token in range(4):  # each virtual token is one real token's key and value in every layer
            row = np.flatnonzero(np.all(keys == prefix[layer, 0, token], axis=1))
            assert row.size and np.array_equal(values[row[0]], prefix[layer, 1, token])
    x = exp.task.sample("test", 1, 5, np.random.default_rng(0)).xq[0]
    out = exp.peft(adapted, frozen, x)
    assert not mx.allclose(exp.peft({**adapted, "prefix": adapted["prefix"] * 2}, frozen, x), out).item()
    assert not mx.allclose(exp.model(merge(frozen, {"head": adapted["head"]}), x), out).item()  # not the backbone
    _, _, _, random = setup(compose_cfg, "peft=prefix_tuning", "peft.init=random", "peft.init_std=0.5")
    assert 0.4 < float(np.std(np.array(random["prefix"]))) < 0.6
    with pytest.raises(ConfigError, match="model=transformer, model=hf_encoder or model=hf_vit"):
        build(compose_cfg("task=digits", "peft=prefix_tuning", "model=mlp"))


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3", "dora", "bitfit"])
def test_merging_folds_the_adapter_into_the_backbone(compose_cfg, method):
    exp, backbone, frozen, adapted = setup(compose_cfg, f"peft={method}")
    rng = np.random.default_rng(0)
    moved = tree_map(lambda a: a + mx.array(0.2 * rng.normal(size=a.shape).astype(np.float32)), adapted)
    x = exp.task.sample("test", 1, 5, np.random.default_rng(0)).xq[0]
    merged = exp.peft.merged(moved, frozen)
    np.testing.assert_allclose(np.array(exp.model.features(merged, x)), np.array(exp.peft.features(moved, frozen, x)),
                               atol=1e-5)
    assert np.abs(np.array(exp.model.features(merged, x)) - np.array(exp.model.features(backbone, x))).max() > 1e-3


# MLX's CPU float64 is float32-accurate in two places the transformer uses, noise to a finite difference: the fused
# ``mx.fast.layer_norm`` (forward error 2e-7 here) and ``mx.exp`` under ``mx.softmax`` (1e-6 on exp of N(0, 1)
# inputs; ``mx.power`` is exact). The meta-gradient tests swap in these, the same functions at float64 accuracy.
def exact_layer_norm(params: dict, x: mx.array, eps: float = 1e-5) -> mx.array:
    mean = x.mean(axis=-1, keepdims=True)
    variance = mx.square(x - mean).mean(axis=-1, keepdims=True)
    return (x - mean) * mx.rsqrt(variance + eps) * params["scale"] + params["bias"]


def exact_softmax(x: mx.array, axis: int = -1) -> mx.array:
    e = mx.power(mx.array(np.e, dtype=x.dtype), x - mx.stop_gradient(x.max(axis=axis, keepdims=True)))
    return e / e.sum(axis=axis, keepdims=True)


def float64_problem(method: str, tasks=2, shots=3, queries=4):
    """A one-layer transformer over 3 tokens of 2 features, adapted by ``method`` (perturbed off its start), and a
    batch of regression tasks, in float64 (the caller swaps in ``exact_layer_norm`` and ``exact_softmax``)."""
    from metapeft.models.transformer import Transformer, TransformerConfig
    from metapeft.registry import PEFT_METHODS, import_submodules

    import_submodules("metapeft.peft")
    model = Transformer(OmegaConf.structured(TransformerConfig(hidden_size=4, num_layers=1, num_heads=2,
                                                               mlp_ratio=1)), (3, 2), 1)
    settings = {"lora": {"rank": 1}, "dora": {"rank": 1}, "adalora": {"init_r": 2, "target_r": 1},
                "prefix_tuning": {"num_virtual_tokens": 2}}.get(method, {})
    schema = PEFT_METHODS.schema(method)
    peft = PEFT_METHODS.get(method)(OmegaConf.structured(schema(**settings)), model)
    rng = np.random.default_rng(0)
    backbone = model.init(mx.random.key(0))
    sample = mx.array(rng.normal(size=(8, 3, 2)), dtype=mx.float32)
    adapted = peft.init_adapted(backbone, mx.random.key(1), sample)
    to64 = partial(tree_map, lambda a: a.astype(mx.float64))
    adapted = to64(tree_map(lambda a: a + mx.array(0.1 * rng.normal(size=a.shape), dtype=a.dtype), adapted))
    frozen = to64(peft.frozen(backbone))
    episodes = Episodes(*(mx.array(rng.normal(size=(tasks, n, *shape)), dtype=mx.float64)
                          for n, shape in [(shots, (3, 2)), (shots, (1,)), (queries, (3, 2)), (queries, (1,))]))

    def loss(adapted, frozen, x, y):
        return mx.mean(mx.square(peft(adapted, frozen, x) - y)) + peft.regularizer(adapted)

    return peft, adapted, frozen, episodes, loss


@pytest.mark.parametrize("method, meta_learn", [
    *((method, "adapter") for method in ["lora", "adalora", "ia3", "dora", "bitfit", "prompt_tuning", "prefix_tuning"]),
    *((method, "both") for method in ["lora", "ia3", "dora", "bitfit", "prefix_tuning"]),  # the backbone's too
])
def test_maml_meta_gradient_through_each_method_matches_finite_differences(method, meta_learn, monkeypatch):
    from test_algorithms import finite_difference_gradient, flat, make

    from metapeft.algorithms.maml import MAML, MAMLConfig
    from metapeft.models import transformer

    monkeypatch.setattr(transformer, "layer_norm", exact_layer_norm)
    monkeypatch.setattr(transformer.mx, "softmax", exact_softmax)
    with mx.stream(mx.cpu):
        peft, adapted, frozen, episodes, loss = float64_problem(method)
        learner = make(MAML, MAMLConfig, loss, meta_batch_size=2, inner_lr=0.1, meta_learn=meta_learn)
        meta = learner.initial_meta(adapted, peft.learnable_backbone(frozen))
        _, grads = learner.meta_value_and_grad(meta, frozen, episodes)
        numeric = finite_difference_gradient(lambda m: learner.meta_loss(m, frozen, episodes), meta)
        np.testing.assert_allclose(flat(grads), numeric, rtol=1e-4, atol=1e-7)
        assert np.abs(flat(grads["weights"])).max() > 1e-3


def test_parameter_counts_match_hand_computation(compose_cfg):
    # transformer on digits: embed 8*32+32, positions 8*32, per layer 2 norms (2*64), 4 attention projections
    # 4*(32*32+32), fc1 32*64+64, fc2 64*32+32; final norm 64; 5-way head 32*5+5
    body = (8 * 32 + 32) + 8 * 32 + 2 * (2 * 64 + 4 * (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32)) + 64
    head = 32 * 5 + 5
    per_layer = {
        "lora": 4 * (32 * 4 + 4 * 32) + (32 * 4 + 4 * 64) + (64 * 4 + 4 * 32),  # rank 4 on 6 linear layers
        "adalora": 4 * (32 * 8 + 8 + 8 * 32) + (32 * 8 + 8 + 8 * 64) + (64 * 8 + 8 + 8 * 32),  # init_r 8
    }
    per_layer["ia3"] = 32 + 32 + 64  # key and value outputs, fc2's input
    per_layer["dora"] = per_layer["lora"] + 4 * 32 + 64 + 32  # a magnitude per output feature of each layer
    per_layer["bitfit"] = 2 * 32 + 4 * 32 + 64 + 32  # the norms' shifts, the attention biases, fc1 and fc2
    per_layer["prefix_tuning"] = 2 * 4 * 32  # keys and values of 4 virtual tokens
    expected = {"lora": 2 * per_layer["lora"] + head, "adalora": 2 * per_layer["adalora"] + head,
                "prompt_tuning": 4 * 32 + head, "ia3": 2 * per_layer["ia3"] + head,
                "dora": 2 * per_layer["dora"] + head, "bitfit": 2 * per_layer["bitfit"] + 32 + 32 + head,  # embed, norm
                "prefix_tuning": 2 * per_layer["prefix_tuning"] + head}
    assert body == 17696
    for method, adapted_count in expected.items():
        exp, backbone, frozen, adapted = setup(compose_cfg, f"peft={method}")
        counts = parameter_counts(exp, backbone, adapted, exp.learner.meta_parameters(adapted))
        assert counts["adapted"] == adapted_count, method
        assert counts["total"] == body + adapted_count
        assert counts["adapter_bytes"] == 4 * adapted_count
    exp, backbone, _, adapted = setup(compose_cfg, "peft=none", "model=transformer")
    assert parameter_counts(exp, backbone, adapted, adapted)["total"] == body + head


def test_adalora_rank_budget_follows_its_cubic_schedule(compose_cfg):
    exp, backbone, frozen, adapted = setup(compose_cfg, "peft=adalora", "peft.prune_start=0.2", "peft.prune_end=0.7")
    peft, layers, iterations = exp.peft, 12, 50
    paths = paths_holding(frozen, "ada_mask")
    assert len(paths) == layers
    assert peft.budget(10, iterations, layers) == layers * 8 and peft.budget(35, iterations, layers) == layers * 4
    assert peft.budget(20, iterations, layers) == layers * 4 + int(layers * 4 * (1 - 10 / 25) ** 3)
    rng = np.random.default_rng(0)
    state = peft.init_meta_state(adapted)
    for iteration in range(iterations):
        noise = tree_map(lambda a: mx.array(rng.normal(size=a.shape), dtype=a.dtype), adapted)
        frozen, state = peft.after_meta_step(adapted, noise, frozen, state, iteration, iterations)
        active = sum(int(np.array(get_in(frozen, p)["ada_mask"]).sum()) for p in paths)
        assert active == peft.budget(iteration + 1, iterations, layers), iteration
    report = peft.report(frozen)
    assert report["final_total_rank"] == layers * 4 and len(report["final_rank_per_layer"]) == layers


def test_adalora_orthogonality_regularizer(compose_cfg):
    exp, _, _, adapted = setup(compose_cfg, "peft=adalora")
    assert exp.peft.regularizer(adapted).item() == pytest.approx(0.0, abs=1e-8)  # factors start orthonormal
    skewed = tree_map(lambda a: 2 * a, adapted)
    assert exp.peft.regularizer(skewed).item() > 1.0


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "metasgd", "anil", "protonet"])
def test_every_pair_lowers_the_meta_loss_and_keeps_the_backbone(compose_cfg, algorithm, method):
    # inner_lr 0.1: at digits' default 0.5, FOMAML's first-order gradient is too biased to descend reliably
    exp, backbone, frozen, adapted = setup(compose_cfg, f"algorithm={algorithm}", f"peft={method}",
                                           "algorithm.meta_batch_size=2", "algorithm.inner_lr=0.1",
                                           "peft.prune_start=0.1" if method == "adalora" else "seed=0")
    before = snapshot(frozen)
    episodes = exp.task.sample("train", 2, 2, np.random.default_rng(0))  # one fixed batch: the loss must fall
    log = TrainLog()
    meta, frozen_after = meta_train(exp.learner, exp.learner.meta_parameters(adapted), frozen, MetaTraining(
        lambda: episodes, num_iterations=15, validate=lambda m, f: 0.0, val_interval=100, progress=False,
        after_step=exp.peft.after_meta_step, after_step_state=exp.peft.init_meta_state(adapted)), log)
    losses = [row["loss"] for row in log.rows]
    assert losses[-1] < losses[0], losses
    after = snapshot(frozen_after)
    backbone_keys = [k for k in before if "ada_mask" not in k]
    assert all(np.array_equal(before[k], after[k]) for k in backbone_keys)  # bit-for-bit
    assert count(meta["weights"]) == count(adapted)


def test_lora_dropout_acts_only_while_adapting(compose_cfg):
    exp, backbone, frozen, adapted = setup(compose_cfg, "peft=lora", "peft.dropout=0.5")
    adapted = {**tree_map(lambda a: a + 0.1, adapted)}  # B != 0, so the LoRA branch contributes
    x = exp.task.sample("test", 1, 5, np.random.default_rng(0)).xq[0]
    plain, _, _, _ = setup(compose_cfg, "peft=lora")
    predicting = exp.peft(adapted, frozen, x)
    assert mx.array_equal(predicting, plain.peft(adapted, frozen, x)).item()  # no dropout when predicting
    first, second = exp.peft(adapted, frozen, x, train=True), exp.peft(adapted, frozen, x, train=True)
    assert not mx.allclose(first, predicting).item() and not mx.allclose(first, second).item()


def test_lora_dropout_runs_are_reproducible(compose_cfg, tmp_path):
    overrides = ["task=digits", "peft=lora", "peft.dropout=0.3", "mode=tiny", "pretrain.iterations=10",
                 f"pretrain.cache_dir={tmp_path / 'cache'}", "shots.eval=[5]"]
    first, second = run(compose_cfg(*overrides), tmp_path / "a"), run(compose_cfg(*overrides), tmp_path / "b")
    assert first["evaluation"] == second["evaluation"]


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="reads /proc")
def test_adalora_importance_state_does_not_grow_a_graph(compose_cfg):
    """Before pruning starts the masks are not read; the moving averages must still be evaluated every step."""
    import re

    def rss_mb():
        return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

    exp, backbone, frozen, adapted = setup(compose_cfg, "peft=adalora")
    grads = tree_map(lambda a: 0.1 * a, adapted)
    mx.eval(adapted, grads)
    state = exp.peft.init_meta_state(adapted)
    for iteration in range(50):
        frozen, state = exp.peft.after_meta_step(adapted, grads, frozen, state, iteration, 100_000)
    before = rss_mb()
    for iteration in range(50, 550):  # all before pruning starts (20,000)
        frozen, state = exp.peft.after_meta_step(adapted, grads, frozen, state, iteration, 100_000)
    assert rss_mb() - before < 50  # a lazily growing graph took ~470 MB over 1,500 steps here (~0.3 MB a step)


def test_adalora_keep_best_val_keeps_only_parameters_pruned_to_the_final_budget(compose_cfg, tmp_path):
    """Early validations of a still unpruned model may score best; keep=best_val must not return that model."""
    overrides = ["task=digits", "peft=adalora", "peft.prune_start=0.1", "peft.prune_end=0.5", "mode.num_iterations=20",
                 "mode.val_interval=2", "mode.num_val_tasks=4", "mode.num_eval_tasks=6", "pretrain.iterations=10",
                 f"pretrain.cache_dir={tmp_path / 'cache'}", "keep=best_val", "patience=2", "shots.eval=[5]"]
    assert build(compose_cfg(*overrides)).peft.first_keepable_iteration(20) == 9
    assert build(compose_cfg("task=digits", "peft=lora")).peft.first_keepable_iteration(20) == 0
    metrics = run(compose_cfg(*overrides), tmp_path / "run")
    assert metrics["train"]["kept_iteration"] >= 9  # the budget reaches target_r after iteration 9's pruning
    assert metrics["peft"]["final_total_rank"] == 12 * 4
    assert metrics["train"]["iterations"] >= 9 + 2 * 2 + 1  # patience counts only validations from iteration 9 on


def test_adalora_pruning_is_a_function_of_its_inputs(compose_cfg):
    """State is data: the same (weights, gradients, frozen tree, state) give the same masks and state, however
    often and in whatever order the method is called, and the method object keeps nothing between calls."""
    exp, _, frozen, adapted = setup(compose_cfg, "peft=adalora", "peft.prune_start=0", "peft.prune_end=0.5")
    rng = np.random.default_rng(1)
    grads = [tree_map(lambda a: mx.array(rng.normal(size=a.shape), dtype=a.dtype), adapted) for _ in range(3)]
    state = exp.peft.init_meta_state(adapted)
    for iteration, g in enumerate(grads[:2]):
        frozen, state = exp.peft.after_meta_step(adapted, g, frozen, state, iteration, 6)
    first = exp.peft.after_meta_step(adapted, grads[2], frozen, state, 2, 6)
    exp.peft.after_meta_step(adapted, grads[0], frozen, exp.peft.init_meta_state(adapted), 0, 6)  # an unrelated call
    second = exp.peft.after_meta_step(adapted, grads[2], frozen, state, 2, 6)
    a, b = snapshot(list(first)), snapshot(list(second))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert sum(np.array(v).sum() for k, v in a.items() if "ada_mask" in k) < 12 * 8  # it did prune
    assert vars(exp.peft).keys() <= {"cfg", "model"}
