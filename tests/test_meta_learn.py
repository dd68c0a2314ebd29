"""algorithm.meta_learn=backbone|both: the outer loop learns the backbone a PEFT method adapts (priming, LoRA-ML).
The meta-gradient through the backbone is checked against finite differences; under meta_learn=backbone every
task's adapter starts at its fixed initialization, bit for bit."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map
from omegaconf import OmegaConf
from test_algorithms import finite_difference_gradient, flat, make, problem

from metapeft.algorithms.anil import ANIL, ANILConfig
from metapeft.algorithms.maml import MAML, MAMLConfig
from metapeft.algorithms.metasgd import MetaSGD, MetaSGDConfig
from metapeft.algorithms.reptile import Reptile, ReptileConfig
from metapeft.build import build
from metapeft.errors import ConfigError
from metapeft.models.mlp import MLP, MLPConfig
from metapeft.trees import merge


@pytest.fixture(autouse=True)
def on_cpu():
    with mx.stream(mx.cpu):
        yield


def adapter_problem():
    """The tanh network of ``problem()`` split as a PEFT method splits it: the hidden layers are the backbone
    (frozen tree), the adapted tree holds the head and an adapter (a shift of the input, zero at initialization)."""
    weights, episodes, _ = problem()
    model = MLP(OmegaConf.structured(MLPConfig(hidden_sizes=[6, 5], activation="tanh")), (2,), 1)
    frozen = {"hidden": weights["hidden"]}
    adapted = {"head": weights["head"], "shift": mx.zeros((2,), dtype=mx.float64)}

    def loss(adapted, frozen, x, y):
        return mx.mean(mx.square(model(merge(frozen, {"head": adapted["head"]}), x + adapted["shift"]) - y))

    return adapted, frozen, episodes, loss


@pytest.mark.parametrize("cls, schema", [(MAML, MAMLConfig), (MetaSGD, MetaSGDConfig), (ANIL, ANILConfig)])
@pytest.mark.parametrize("meta_learn", ["backbone", "both"])
def test_the_meta_gradient_through_the_backbone_matches_finite_differences(cls, schema, meta_learn):
    adapted, frozen, episodes, loss = adapter_problem()
    learner = make(cls, schema, loss, meta_learn=meta_learn)
    meta = learner.initial_meta(adapted, frozen)
    assert set(meta) >= {"weights", "backbone"}
    _, grads = learner.meta_value_and_grad(meta, {}, episodes)  # the backbone reaches the tasks through meta alone
    if meta_learn == "both":
        numeric = finite_difference_gradient(lambda m: learner.meta_loss(m, {}, episodes), meta)
        np.testing.assert_allclose(flat(grads), numeric, rtol=1e-5, atol=1e-8)
    else:  # the adapter's start is a constant: the gradient is the backbone's, and nothing reaches the start
        numeric = finite_difference_gradient(
            lambda backbone: learner.meta_loss({**meta, "backbone": backbone}, {}, episodes), meta["backbone"])
        np.testing.assert_allclose(flat(grads["backbone"]), numeric, rtol=1e-5, atol=1e-8)
        assert not np.any(flat(grads["weights"]))
    assert np.abs(flat(grads["backbone"])).max() > 1e-3  # the backbone is really learned


def test_meta_learn_backbone_keeps_the_adapters_start_bit_for_bit_and_the_backbone_has_its_own_rate():
    adapted, frozen, episodes, loss = adapter_problem()
    moved = {}
    for meta_learn in ("backbone", "both"):
        learner = make(MAML, MAMLConfig, loss, meta_learn=meta_learn, outer_lr=0.01, backbone_outer_lr=0.001)
        meta = learner.initial_meta(adapted, frozen)
        optimizer = learner.make_optimizer(10)
        optimizer.init(meta)
        updated = meta
        for _ in range(3):
            _, grads = learner.meta_value_and_grad(updated, {}, episodes)
            updated = optimizer.apply_gradients(grads, updated)
        moved[meta_learn] = {part: np.abs(flat(updated[part]) - flat(meta[part])) for part in ("weights", "backbone")}
    assert not np.any(moved["backbone"]["weights"])  # bit for bit
    assert moved["backbone"]["backbone"].max() > 0
    # Adam's steps are about its learning rate times a factor the same for every entry's first steps: the
    # backbone (0.001) moves a tenth of the adapter (0.01)
    ratio = moved["both"]["weights"].max() / moved["both"]["backbone"].max()
    assert 8 < ratio < 12


def test_the_first_meta_gradient_reaches_a_backbone_that_is_also_the_frozen_tree():
    """As the runner calls it: the frozen tree passed to every step is the very tree the backbone was read from.
    MLX gives a dict shared by the differentiated and a non-differentiated argument a zero gradient, so the
    meta-parameters must hold their own containers (a shared one lost the first step's backbone gradient)."""
    adapted, frozen, episodes, loss = adapter_problem()
    learner = make(MAML, MAMLConfig, loss, meta_learn="both")
    _, shared = learner.meta_value_and_grad(learner.initial_meta(adapted, frozen), frozen, episodes)
    _, separate = learner.meta_value_and_grad(learner.initial_meta(adapted, frozen), {}, episodes)
    np.testing.assert_array_equal(flat(shared), flat(separate))
    assert np.abs(flat(shared["backbone"])).max() > 1e-3


def test_the_meta_learned_backbone_is_what_tasks_adapt_over():
    adapted, frozen, episodes, loss = adapter_problem()
    learner = make(MAML, MAMLConfig, loss, meta_learn="backbone")
    meta = learner.initial_meta(adapted, frozen)
    meta = {**meta, "backbone": tree_map(lambda w: 2 * w, meta["backbone"])}
    doubled = learner.meta_loss(meta, {}, episodes).item()
    plain = make(MAML, MAMLConfig, loss)
    assert doubled == pytest.approx(plain.meta_loss(plain.initial_meta(adapted, frozen),
                                                    tree_map(lambda w: 2 * w, frozen), episodes).item(), rel=1e-12)


def test_reptile_has_no_update_for_the_backbone_and_refuses_it():
    _, _, _, loss = adapter_problem()
    with pytest.raises(ConfigError) as error:
        make(Reptile, ReptileConfig, loss, meta_learn="backbone")
    assert error.value.key == "algorithm.meta_learn"


@pytest.mark.parametrize("overrides", [["peft=none", "algorithm.meta_learn=backbone"],
                                       ["peft=adalora", "algorithm.meta_learn=backbone"]])
def test_meta_learning_a_backbone_that_is_not_there_or_a_pruning_without_its_gradient_is_refused(compose_cfg,
                                                                                                  overrides):
    with pytest.raises(ConfigError) as error:
        build(compose_cfg("task=digits", *overrides))
    assert error.value.key == "algorithm.meta_learn"


def test_an_unknown_meta_learn_value_is_refused_at_composition(compose_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="meta_learn"):
        compose_cfg("algorithm.meta_learn=everything")
