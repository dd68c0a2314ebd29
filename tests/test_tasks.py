from __future__ import annotations

import numpy as np
from omegaconf import OmegaConf

from metapeft.tasks.digits import Digits, DigitsConfig, canonical_class, rotated_digit_classes
from metapeft.tasks.sinusoid import Sinusoid, SinusoidConfig


def test_sinusoid_episodes_follow_the_maml_protocol():
    task = Sinusoid(OmegaConf.structured(SinusoidConfig))
    amplitude, phase = task.sample_functions(10_000, np.random.default_rng(0))
    assert 0.1 <= amplitude.min() and amplitude.max() <= 5.0 and 0 <= phase.min() and phase.max() <= np.pi
    episodes = task.sample("train", 7, 5, np.random.default_rng(0))
    assert episodes.xs.shape == (7, 5, 1) and episodes.xq.shape == (7, 10, 1) and episodes.yq.shape == (7, 10, 1)
    xs = np.array(episodes.xs)
    assert -5 <= xs.min() and xs.max() <= 5
    assert np.abs(np.array(episodes.ys)).max() <= 5.0


def test_rotations_that_coincide_are_one_class():
    assert canonical_class(0, 2) == canonical_class(0, 0)
    assert canonical_class(8, 3) == canonical_class(8, 1)
    assert canonical_class(6, 2) == canonical_class(9, 0)
    assert canonical_class(9, 3) == canonical_class(6, 1)
    assert canonical_class(7, 2) != canonical_class(7, 0)
    classes = rotated_digit_classes()
    assert len(classes) == 30  # 40 digit-rotations minus 6 (0, 1, 8 at 180/270) minus 4 (6/9 pairs)
    assert sum(len(v) for v in classes.values()) == 4 * 1797


def test_digits_splits_are_disjoint_and_episodes_are_labelled():
    task = Digits(OmegaConf.structured(DigitsConfig))
    names = task.class_names
    assert [len(names[s]) for s in ("train", "val", "test")] == [18, 5, 7]
    assert not set(names["train"]) & set(names["test"]) and not set(names["val"]) & set(names["test"])
    episodes = task.sample("test", 3, 2, np.random.default_rng(0))
    assert episodes.xs.shape == (3, 10, 8, 8) and episodes.xq.shape == (3, 50, 8, 8)
    assert sorted(np.unique(np.array(episodes.ys)).tolist()) == [0, 1, 2, 3, 4]
    # the support images of each task come from five distinct classes: query images share the support's class
    test_images = {k: v for k, v in rotated_digit_classes().items() if k in names["test"]}
    first_support = np.array(episodes.xs[0, 0])
    owners = [k for k, v in test_images.items() if (v == first_support).all(axis=(1, 2)).any()]
    assert owners  # drawn from a meta-test class


def test_digits_tasks_name_the_digits_their_classes_are_made_of():
    task = Digits(OmegaConf.structured(DigitsConfig))
    episodes, drawn = task.sample_with_classes("test", 40, 1, np.random.default_rng(3))
    classes = drawn.sources
    assert drawn.classes.max() < 7 and (task.class_sources["test"][drawn.classes] == classes).all()
    same = task.sample("test", 40, 1, np.random.default_rng(3))
    assert all(np.array_equal(np.array(a), np.array(b)) for a, b in zip(episodes, same))
    assert classes.shape == (40, 5)
    test_digits = {min(d, {6: 9, 9: 6}.get(d, d)) for d, _ in task.class_names["test"]}
    assert set(np.unique(classes)) <= test_digits
    # the first support image (label 0) comes from a class of the digit named first
    digit = int(classes[0, 0])
    sources = {k: v for k, v in rotated_digit_classes().items() if k in task.class_names["test"]
               and min(k[0], {6: 9, 9: 6}.get(k[0], k[0])) == digit}
    assert any((v == np.array(episodes.xs[0, 0])).all(axis=(1, 2)).any() for v in sources.values())


def test_sinusoid_tasks_are_independent_draws():
    task = Sinusoid(OmegaConf.structured(SinusoidConfig))
    assert task.sample_with_classes("test", 3, 5, np.random.default_rng(0))[1] is None
