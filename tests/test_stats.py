"""Confidence intervals over few-shot tasks that share classes (``metapeft.stats``)."""
import numpy as np
import pytest

from metapeft.stats import (
    CLASS_JACKKNIFE,
    ONE_SEED,
    SEEDS,
    SEEDS_AND_CLASSES,
    TASKS_INDEPENDENT,
    Interval,
    ci95_method,
    class_count,
    class_set_count,
    difference_ci95,
    holm,
    mean_ci95,
    p_value,
    seeds_ci95,
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


def crossed_runs(rng, num_seeds, seed_sd, num_classes=20, class_sd=0.05, noise_sd=0.05, tasks=100, classes=True):
    """Per-task values of ``num_seeds`` training runs scored on tasks of the same meta-test classes: a run effect
    (seed), class effects shared by every run, episode noise. The true mean over new runs and new classes is 0."""
    class_effects = rng.normal(0.0, class_sd, num_classes)
    values, sources = [], []
    for _ in range(num_seeds):
        drawn = np.stack([rng.choice(num_classes, 5, replace=False) for _ in range(tasks)])
        run_effect = rng.normal(0.0, seed_sd)
        shared = class_effects[drawn].mean(axis=1) if classes else rng.normal(0.0, class_sd, tasks)
        values.append(run_effect + shared + rng.normal(0.0, noise_sd, tasks))
        sources.append(drawn)
    return values, (sources if classes else None)


@pytest.mark.parametrize("seed_sd", [0.0, 0.06])
@pytest.mark.parametrize("classes", [True, False])
def test_the_seed_interval_covers_the_mean_over_new_runs_and_new_classes(seed_sd, classes):
    rng = np.random.default_rng(2)
    covered, pooled_covered, repeats = 0, 0, 200
    for _ in range(repeats):
        values, sources = crossed_runs(rng, 5, seed_sd, classes=classes, tasks=60)
        interval = seeds_ci95(values, sources)
        covered += abs(interval.mean) <= interval.ci95
        mean, half = mean_ci95(np.concatenate(values), None if sources is None else np.concatenate(sources))
        pooled_covered += abs(mean) <= half
    assert covered / repeats >= 0.91  # nominal 0.95; 200 repeats measure it to about +-0.03
    if seed_sd > 0:  # pooling the seeds' tasks as one sample misses the run-to-run variance
        assert pooled_covered / repeats < 0.8


def test_the_seed_interval_names_its_method_and_one_seed_says_it_covers_test_tasks_only():
    rng = np.random.default_rng(3)
    values, sources = crossed_runs(rng, 3, 0.01)
    assert seeds_ci95(values, sources).method == SEEDS_AND_CLASSES
    assert seeds_ci95(values, None).method == SEEDS
    assert seeds_ci95(values, None).df == 2
    one = seeds_ci95(values[:1], sources[:1])
    assert one.method == ONE_SEED and one.num_seeds == 1
    assert (one.mean, one.ci95) == pytest.approx(mean_ci95(values[0], sources[0]))
    with pytest.raises(ValueError, match="two test tasks"):
        seeds_ci95([np.zeros(1)])


def test_holm_adjusts_step_down_and_controls_the_family_wise_error():
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.2]) == pytest.approx([0.2])
    rng = np.random.default_rng(4)
    # 12 comparisons of nothing: some raw p-value under 0.05 is common, an adjusted one rare
    raw, adjusted = 0, 0
    for _ in range(400):
        p = rng.uniform(size=12)
        raw += p.min() < 0.05
        adjusted += holm(p).min() < 0.05
    assert raw / 400 > 0.4 and adjusted / 400 <= 0.07


def test_the_p_value_agrees_with_the_interval():
    interval = Interval(mean=0.1, ci95=0.1, df=10, method=SEEDS)
    assert p_value(interval) == pytest.approx(0.05)
    assert p_value(Interval(0.0, 0.1, 10, SEEDS)) == pytest.approx(1.0)
