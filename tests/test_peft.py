"""PEFT methods: exact at initialization, a frozen backbone, AdaLoRA's schedule, and every algorithm x method pair."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from metapeft.build import build, parameter_counts
from metapeft.experiment import run
from metapeft.train import MetaTraining, TrainLog, meta_train
from metapeft.trees import count, get_in, merge, paths_holding


def setup(compose_cfg, *overrides, seed=0):
    exp = build(compose_cfg("task=digits", *overrides))
    backbone = exp.model.init(mx.random.key(seed))  # a stand-in for the pretrained backbone
    inputs, _ = exp.task.pretraining_batch(np.random.default_rng(0), 64)
    return exp, backbone, exp.peft.frozen(backbone), exp.peft.init_adapted(backbone, mx.random.key(seed + 1), inputs)


def snapshot(tree):
    return {k: np.array(v) for k, v in tree_flatten(tree)}


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_low_rank_methods_start_exactly_at_the_backbone(compose_cfg, method):
    exp, backbone, frozen, adapted = setup(compose_cfg, f"peft={method}")
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


def test_parameter_counts_match_hand_computation(compose_cfg):
    # transformer on digits: embed 8*32+32, positions 8*32, per layer 2 norms (2*64), 4 attention projections
    # 4*(32*32+32), fc1 32*64+64, fc2 64*32+32; final norm 64; 5-way head 32*5+5
    body = (8 * 32 + 32) + 8 * 32 + 2 * (2 * 64 + 4 * (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32)) + 64
    head = 32 * 5 + 5
    per_layer = {
        "lora": 4 * (32 * 4 + 4 * 32) + (32 * 4 + 4 * 64) + (64 * 4 + 4 * 32),  # rank 4 on 6 linear layers
        "adalora": 4 * (32 * 8 + 8 + 8 * 32) + (32 * 8 + 8 + 8 * 64) + (64 * 8 + 8 + 8 * 32),  # init_r 8
    }
    expected = {"lora": 2 * per_layer["lora"] + head, "adalora": 2 * per_layer["adalora"] + head,
                "prompt_tuning": 4 * 32 + head}
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


@pytest.mark.parametrize("method", ["none", "lora", "adalora", "prompt_tuning"])
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
