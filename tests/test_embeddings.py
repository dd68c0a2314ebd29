"""Task embeddings mean something: nearby tasks are more similar than distant ones."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from metapeft.api import load_run
from metapeft.embeddings import fisher_embedding, plot_similarity, similarity_matrix, statistics_embedding
from metapeft.experiment import run
from metapeft.tasks.digits import rotated_digit_classes


@pytest.fixture(scope="module")
def sinusoid_run(tmp_path_factory):
    from helpers import compose_config
    out = tmp_path_factory.mktemp("sinusoid")
    run(compose_config("task=sinusoid", "mode.num_iterations=300", "mode.num_eval_tasks=10"), out)
    return load_run(out)


def sinusoid_task(amplitude, phase, x):
    return mx.array(x), mx.array(amplitude * np.sin(x - phase))


@pytest.mark.parametrize("measure", ["cosine", "rbf"])
def test_nearby_sinusoids_are_more_similar_than_distant_ones(sinusoid_run, measure, tmp_path):
    x = np.linspace(-5, 5, 10, dtype=np.float32)[:, None]
    learned = sinusoid_run
    tasks = {"A=1.0 φ=0.5": (1.0, 0.5), "A=1.2 φ=0.6": (1.2, 0.6), "A=4.5 φ=2.8": (4.5, 2.8)}
    embeddings = [fisher_embedding(learned.experiment, learned.meta, learned.frozen, *sinusoid_task(a, p, x))
                  for a, p in tasks.values()]
    assert all(np.isfinite(e).all() and e.shape == embeddings[0].shape for e in embeddings)
    similarity = similarity_matrix(embeddings, measure)
    assert similarity[0, 1] > similarity[0, 2] and similarity[1, 0] > similarity[1, 2]
    assert np.allclose(np.diag(similarity), 1.0)
    assert plot_similarity(similarity, list(tasks), tmp_path / "sim.png", "sinusoid tasks").stat().st_size > 0


def test_digit_tasks_sharing_classes_are_more_similar(compose_cfg, tmp_path):
    run(compose_cfg("task=digits", "mode.num_iterations=200", "mode.num_eval_tasks=10"), tmp_path / "run")
    learned = load_run(tmp_path / "run")
    classes = list(rotated_digit_classes().values())
    rng = np.random.default_rng(0)

    def task(class_ids):
        images = [classes[c][rng.choice(len(classes[c]), 5, replace=False)] for c in class_ids]
        return mx.array(np.concatenate(images)), mx.array(np.repeat(np.arange(5, dtype=np.int32), 5))

    first, same_classes, other_classes = task([0, 1, 2, 3, 4]), task([0, 1, 2, 3, 4]), task([10, 11, 12, 13, 14])
    for embed in (lambda t: fisher_embedding(learned.experiment, learned.meta, learned.frozen, *t),
                  lambda t: statistics_embedding(*t, num_classes=5)):
        similarity = similarity_matrix([embed(first), embed(same_classes), embed(other_classes)])
        assert similarity[0, 1] > similarity[0, 2]
