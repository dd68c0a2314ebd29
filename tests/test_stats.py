"""Confidence intervals over few-shot tasks that share classes (``metapeft.stats``)."""
import numpy as np
import pytest

from metapeft.stats import (
    CLASS_JACKKNIFE,
    TASKS_INDEPENDENT,
    ci95_method,
    class_count,
    class_set_count,
    difference_ci95,
    mean_ci95,
)


def simulated_tasks(rng, num_classes, n_way, num_tasks, class_sd, noise_sd):
    """Tasks whose score is the mean effect of their classes plus episode noise; the true mean over new classes
    drawn from the same population is 0."""
    effects = rng.normal(0.0, class_sd, num_classes)
    classes = np.stack([rng.choice(num_classes, n_way, replace=False) for _ in range(num_tasks)])
    return effects[classes].mean(axis=1) + rng.normal(0.0, noise_sd, num_tasks), classes


def coverage(num_classes, class_sd, noise_sd, repeats=200):
    rng = np.random.default_rng(0)
    covered = {"independent": 0, "classes": 0}
    widths = {"independent": [], "classes": []}
    for _ in range(repeats):
        values, classes = simulated_tasks(rng, num_classes, 5, 600, class_sd, noise_sd)
        for name, given in (("independent", None), ("classes", classes)):
            mean, half_width = mean_ci95(values, given)
            covered[name] += abs(mean) <= half_width
            widths[name].append(half_width)
    return {k: v / repeats for k, v in covered.items()}, {k: float(np.mean(v)) for k, v in widths.items()}


def test_the_independent_interval_is_too_narrow_when_tasks_share_few_classes_and_the_class_interval_is_not():
    # Digits' shape: 600 5-way tasks from 7 meta-test classes, classes differ more than episodes do.
    covered, _ = coverage(num_classes=7, class_sd=0.1, noise_sd=0.05)
    assert covered["independent"] < 0.3
    assert covered["classes"] >= 0.9


def test_many_classes_each_in_few_tasks_still_need_the_class_interval():
    covered, _ = coverage(num_classes=300, class_sd=0.1, noise_sd=0.05)
    assert covered["independent"] < 0.8
    assert covered["classes"] >= 0.9


def test_without_class_effects_the_class_interval_is_conservative_by_at_most_about_the_square_root_of_n_way():
    covered, widths = coverage(num_classes=300, class_sd=0.0, noise_sd=0.05, repeats=50)
    assert covered["independent"] >= 0.85 and covered["classes"] >= 0.95
    assert 1.0 < widths["classes"] / widths["independent"] < 1.2 * np.sqrt(5)


def test_independent_tasks_get_the_student_t_interval():
    values = np.array([0.2, 0.4, 0.9, 0.5])
    mean, half_width = mean_ci95(values)
    assert mean == pytest.approx(0.5)
    assert half_width == pytest.approx(3.182446305284263 * values.std(ddof=1) / 2)  # t(3) quantile
    assert ci95_method(None) == TASKS_INDEPENDENT


def test_a_class_held_by_every_task_leaves_no_class_variance_to_estimate():
    classes = np.array([[0, 1], [0, 2], [0, 3]])
    values = np.array([0.1, 0.5, 0.3])
    assert mean_ci95(values, classes) == mean_ci95(values)
    assert ci95_method(classes).startswith(TASKS_INDEPENDENT)
    assert ci95_method(np.array([[0, 1], [2, 3]])) == CLASS_JACKKNIFE


def test_class_sets_are_counted_regardless_of_order():
    classes = np.array([[0, 1, 2], [2, 1, 0], [0, 1, 3]])
    assert class_set_count(classes) == 2
    assert class_count(classes) == 4


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="classes for 2 tasks"):
        mean_ci95(np.zeros(3), np.array([[0, 1], [1, 2]]))


def test_a_difference_over_the_same_classes_lets_their_effects_cancel():
    rng = np.random.default_rng(1)
    effects = rng.normal(0.0, 0.1, 7)
    first_classes = np.stack([rng.choice(7, 5, replace=False) for _ in range(600)])
    second_classes = np.stack([rng.choice(7, 5, replace=False) for _ in range(600)])
    first = effects[first_classes].mean(axis=1) + 0.05 + rng.normal(0, 0.02, 600)  # +0.05 on every class
    second = effects[second_classes].mean(axis=1) + rng.normal(0, 0.02, 600)
    gain, joint = difference_ci95(first, first_classes, second, second_classes)
    separate = np.hypot(mean_ci95(first, first_classes)[1], mean_ci95(second, second_classes)[1])
    assert abs(gain - 0.05) < joint < 0.5 * separate  # covers the truth, far narrower than the two apart
    assert difference_ci95(first, None, second, None)[1] == pytest.approx(np.hypot(mean_ci95(first)[1],
                                                                                    mean_ci95(second)[1]))
