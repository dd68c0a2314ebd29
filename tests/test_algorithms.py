"""Every algorithm does what its paper says: gradients checked against finite differences and hand computation."""
from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from omegaconf import OmegaConf

from metapeft.algorithms.anil import ANIL, ANILConfig
from metapeft.algorithms.base import HeadInit
from metapeft.algorithms.fomaml import FOMAML, FOMAMLConfig
from metapeft.algorithms.maml import MAML, MAMLConfig
from metapeft.algorithms.metasgd import MetaSGD, MetaSGDConfig
from metapeft.algorithms.protonet import ProtoNet, ProtoNetConfig
from metapeft.algorithms.reptile import Reptile, ReptileConfig
from metapeft.errors import ConfigError
from metapeft.models.mlp import MLP, MLPConfig
from metapeft.tasks.base import Episodes

DTYPE = mx.float64  # finite differences need double precision (MLX supports it on the CPU)


@pytest.fixture(autouse=True)
def on_cpu():
    with mx.stream(mx.cpu):
        yield


def problem(seed=0, tasks=3, shots=4, queries=5):
    """A smooth (tanh) regression network and a batch of random regression tasks, in float64."""
    model = MLP(OmegaConf.structured(MLPConfig(hidden_sizes=[6, 5], activation="tanh")), (2,), 1)
    weights = tree_map(lambda a: a.astype(DTYPE), model.init(mx.random.key(seed)))
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=(tasks, n, d)) for n, d in [(shots, 2), (shots, 1), (queries, 2), (queries, 1)]]
    episodes = Episodes(*(mx.array(a, dtype=DTYPE) for a in arrays))

    def loss(adapted, frozen, x, y):
        return mx.mean(mx.square(model(adapted, x) - y))

    return weights, episodes, loss


def make(cls, schema, loss, features=None, num_classes=None, **overrides):
    cfg = OmegaConf.structured(schema(**{"inner_lr": 0.3, "num_inner_steps": 2, "meta_batch_size": 3, **overrides}))
    return cls(cfg, SimpleNamespace(loss=loss, features=features, num_classes=num_classes))


def flat(tree):
    return np.concatenate([np.array(v).ravel() for _, v in tree_flatten(tree)])


def unflat(vector, like):
    leaves, out, i = tree_flatten(like), [], 0
    for name, v in leaves:
        out.append((name, mx.array(vector[i: i + v.size].reshape(v.shape), dtype=DTYPE)))
        i += v.size
    return tree_unflatten(out)


def finite_difference_gradient(fn, meta, eps=1e-6):
    theta = flat(meta)
    grad = np.zeros_like(theta)
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = eps
        grad[i] = (fn(unflat(theta + e, meta)).item() - fn(unflat(theta - e, meta)).item()) / (2 * eps)
    return grad


@pytest.mark.parametrize("cls, schema", [(MAML, MAMLConfig), (MetaSGD, MetaSGDConfig)])
def test_second_order_meta_gradient_matches_finite_differences(cls, schema):
    weights, episodes, loss = problem()
    learner = make(cls, schema, loss)
    meta = learner.meta_parameters(weights)
    _, grads = learner.meta_value_and_grad(meta, {}, episodes)
    numeric = finite_difference_gradient(lambda m: learner.meta_loss(m, {}, episodes), meta)
    np.testing.assert_allclose(flat(grads), numeric, rtol=1e-5, atol=1e-8)


def test_fomaml_drops_the_second_order_term():
    weights, episodes, loss = problem()
    maml, fomaml = make(MAML, MAMLConfig, loss), make(FOMAML, FOMAMLConfig, loss)
    meta = maml.meta_parameters(weights)
    maml_loss, maml_grads = maml.meta_value_and_grad(meta, {}, episodes)
    fo_loss, fo_grads = fomaml.meta_value_and_grad(meta, {}, episodes)
    assert maml_loss.item() == pytest.approx(fo_loss.item(), rel=1e-12)  # same adapted parameters, same loss
    difference = np.linalg.norm(flat(maml_grads) - flat(fo_grads)) / np.linalg.norm(flat(maml_grads))
    assert difference > 1e-2, "FOMAML's gradient should differ from MAML's: the Hessian term must be present"
    # FOMAML's gradient is the mean over tasks of the query-loss gradient at the adapted parameters
    expected = np.zeros_like(flat(weights))
    for t in range(len(episodes)):
        xs, ys, xq, yq = (a[t] for a in episodes)
        phi = weights
        for _ in range(2):
            phi = tree_map(lambda w, g: w - 0.3 * g, phi, mx.grad(loss)(phi, {}, xs, ys))
        expected += flat(mx.grad(loss)(phi, {}, xq, yq)) / len(episodes)
    np.testing.assert_allclose(flat(fo_grads["weights"]), expected, rtol=1e-10)


def test_metasgd_with_uniform_rates_adapts_like_maml():
    weights, episodes, loss = problem()
    maml, metasgd = make(MAML, MAMLConfig, loss), make(MetaSGD, MetaSGDConfig, loss, init_lr=0.3)
    xs, ys = episodes.xs[0], episodes.ys[0]
    np.testing.assert_allclose(flat(metasgd.adapt(metasgd.meta_parameters(weights), {}, xs, ys)),
                               flat(maml.adapt(maml.meta_parameters(weights), {}, xs, ys)), rtol=1e-12)
    # and its learning rates are meta-learned: they receive a non-zero meta-gradient
    _, grads = metasgd.meta_value_and_grad(metasgd.meta_parameters(weights), {}, episodes)
    assert np.abs(flat(grads["lr"])).max() > 0


def test_reptile_moves_toward_the_mean_adapted_parameters():
    weights, episodes, loss = problem()
    epsilon = 0.25
    reptile = make(Reptile, ReptileConfig, loss, outer_lr=epsilon, anneal=False, num_inner_steps=3)
    meta = reptile.meta_parameters(weights)
    optimizer = reptile.make_optimizer(10)
    _, pseudo_grads = reptile.meta_value_and_grad(meta, {}, episodes)
    updated = optimizer.apply_gradients(pseudo_grads, meta)
    phis = []
    for t in range(len(episodes)):
        phi = weights
        for _ in range(3):
            phi = tree_map(lambda w, g: w - 0.3 * g, phi, mx.grad(loss)(phi, {}, episodes.xs[t], episodes.ys[t]))
        phis.append(flat(phi))
    theta = flat(weights)
    np.testing.assert_allclose(flat(updated), theta + epsilon * (np.mean(phis, axis=0) - theta), rtol=1e-10)


def test_reptile_anneals_its_outer_step_size():
    _, _, loss = problem()
    reptile = make(Reptile, ReptileConfig, loss, outer_lr=1.0, outer_lr_final=0.0, anneal=True)
    optimizer = reptile.make_optimizer(100)
    params = {"theta": mx.array(0.0)}
    optimizer.init(params)
    steps = []  # with a unit pseudo-gradient, each update moves theta by that iteration's epsilon
    for _ in range(100):
        updated = optimizer.apply_gradients({"theta": mx.array(1.0)}, params)
        steps.append(params["theta"].item() - updated["theta"].item())
        params = updated
    assert np.allclose([steps[0], steps[50], steps[99]], [1.0, 0.5, 0.01], atol=1e-5)  # float32 theta


def test_anil_meta_gradient_matches_finite_differences_and_adapts_only_the_head():
    weights, episodes, loss = problem()
    anil = make(ANIL, ANILConfig, loss)
    meta = anil.meta_parameters(weights)
    _, grads = anil.meta_value_and_grad(meta, {}, episodes)
    numeric = finite_difference_gradient(lambda m: anil.meta_loss(m, {}, episodes), meta)
    np.testing.assert_allclose(flat(grads), numeric, rtol=1e-5, atol=1e-8)
    adapted = anil.adapt(meta, {}, episodes.xs[0], episodes.ys[0])
    body_before, body_after = flat_leaves(weights["hidden"]), flat_leaves(adapted["hidden"])
    assert all(mx.array_equal(a, b).item() for a, b in zip(body_after, body_before))
    assert not mx.array_equal(adapted["head"]["weight"], weights["head"]["weight"]).item()
    # the body's meta-gradient is second order through the head's inner steps: first_order changes it
    _, first_order = make(ANIL, ANILConfig, loss, first_order=True).meta_value_and_grad(meta, {}, episodes)
    assert not np.allclose(flat(grads["weights"]["hidden"]), flat(first_order["weights"]["hidden"]))


def flat_leaves(tree):
    return [v for _, v in tree_flatten(tree)]


def classification_problem(seed=0, tasks=2, n_way=3, shots=2, queries=4, dim=5):
    model = MLP(OmegaConf.structured(MLPConfig(hidden_sizes=[6], activation="tanh")), (dim,), n_way)
    weights = tree_map(lambda a: a.astype(DTYPE), model.init(mx.random.key(seed)))
    rng = np.random.default_rng(seed)
    labels = lambda n: np.tile(np.arange(n_way), (tasks, n))
    episodes = Episodes(mx.array(rng.normal(size=(tasks, n_way * shots, dim)), dtype=DTYPE),
                        mx.array(labels(shots)),
                        mx.array(rng.normal(size=(tasks, n_way * queries, dim)), dtype=DTYPE),
                        mx.array(labels(queries)))

    def loss(adapted, frozen, x, y):
        logits = model(adapted, x)
        return -mx.mean(mx.take_along_axis(logits - mx.logsumexp(logits, axis=-1, keepdims=True), y[:, None], -1))

    return model, weights, episodes, loss


def test_protonet_loss_is_the_query_cross_entropy_of_negative_squared_distances_to_prototypes():
    model, weights, episodes, loss = classification_problem()
    protonet = make(ProtoNet, ProtoNetConfig, loss, features=lambda w, f, x: model.features(w, x), num_classes=3,
                    num_inner_steps=0, head_init=HeadInit.prototypes)
    meta = protonet.meta_parameters(weights)
    expected = []
    for t in range(len(episodes)):
        xs, ys, xq, yq = (np.array(a[t]) for a in episodes)
        fs, fq = np.array(model.features(weights, mx.array(xs))), np.array(model.features(weights, mx.array(xq)))
        prototypes = np.stack([fs[ys == k].mean(axis=0) for k in range(3)])
        logits = -((fq[:, None, :] - prototypes[None]) ** 2).sum(axis=-1)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        expected.append(-log_probs[np.arange(len(yq)), yq].mean())
    assert protonet.meta_loss(meta, {}, episodes).item() == pytest.approx(np.mean(expected), rel=1e-7)
    _, grads = protonet.meta_value_and_grad(meta, {}, episodes)  # the embedding learns through the prototypes
    assert np.abs(flat(grads["weights"]["hidden"])).max() > 0 and np.abs(flat(grads["weights"]["head"])).max() == 0


def test_prototype_head_init_starts_every_gradient_based_algorithm_from_the_prototypes():
    model, weights, episodes, loss = classification_problem()
    features = lambda w, f, x: model.features(w, x)
    proto_maml = make(MAML, MAMLConfig, loss, features=features, num_classes=3, head_init=HeadInit.prototypes)
    start = proto_maml.task_start(proto_maml.meta_parameters(weights), {}, episodes.xs[0], episodes.ys[0])
    fs, ys = np.array(model.features(weights, episodes.xs[0])), np.array(episodes.ys[0])
    prototypes = np.stack([fs[ys == k].mean(axis=0) for k in range(3)])
    fq = np.array(model.features(weights, episodes.xq[0]))
    nearest = (((fq[:, None, :] - prototypes[None]) ** 2).sum(axis=-1)).argmin(axis=1)
    assert (np.array(model(start, episodes.xq[0])).argmax(axis=1) == nearest).all()
    assert mx.array_equal(start["hidden"][0]["weight"], weights["hidden"][0]["weight"]).item()
    with pytest.raises(ConfigError) as error:  # prototypes need classes
        make(MAML, MAMLConfig, loss, head_init=HeadInit.prototypes)
    assert error.value.key == "algorithm.head_init"


@pytest.mark.parametrize("cls, schema", [(MAML, MAMLConfig), (MetaSGD, MetaSGDConfig), (Reptile, ReptileConfig)])
@pytest.mark.parametrize("passes", [{"tasks_per_pass": 2}, {"tasks_per_pass": 1, "checkpoint_inner_steps": True},
                                    {"parallel_passes": 2},
                                    {"tasks_per_pass": 1, "checkpoint_inner_steps": True, "parallel_passes": 2}])
def test_a_meta_batch_taken_in_passes_gives_the_whole_batch_update(cls, schema, passes):
    """3 tasks in passes of 2 + 1 (the single task runs without vmap) or 1 + 1 + 1 with each inner step
    recomputed in the backward pass, one pass at a time or two at once on two CPU streams: the same loss,
    meta-gradient and update as all 3 at once."""
    from metapeft.train import compiled_meta_step

    weights, episodes, loss = problem()
    results = []
    for overrides in ({}, passes):
        learner = make(cls, schema, loss, **overrides)
        meta = learner.meta_parameters(weights)
        optimizer = learner.make_optimizer(10)
        optimizer.init(meta)
        results.append(compiled_meta_step(learner, optimizer)(meta, {}, *episodes))
    (whole_loss, whole_meta, whole_grads), (loss_in_passes, meta_in_passes, grads_in_passes) = results
    assert loss_in_passes.item() == pytest.approx(whole_loss.item(), rel=1e-12)
    np.testing.assert_allclose(flat(grads_in_passes), flat(whole_grads), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(flat(meta_in_passes), flat(whole_meta), rtol=1e-10, atol=1e-14)


def test_checkpointed_inner_steps_need_one_task_per_pass():
    _, _, loss = problem()
    with pytest.raises(ConfigError) as error:
        make(MAML, MAMLConfig, loss, checkpoint_inner_steps=True)
    assert error.value.key == "algorithm.checkpoint_inner_steps" and "tasks_per_pass=1" in str(error.value)
    with pytest.raises(ConfigError) as error:
        make(MAML, MAMLConfig, loss, tasks_per_pass=0)
    assert error.value.key == "algorithm.tasks_per_pass"
    with pytest.raises(ConfigError) as error:
        make(MAML, MAMLConfig, loss, parallel_passes=0)
    assert error.value.key == "algorithm.parallel_passes" and ">= 1" in str(error.value)
