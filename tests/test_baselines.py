"""Every baseline against a hand computation on a tiny episode, and baselines in every run's metrics."""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import run_cli
from metapeft.baselines import logistic_regression, nearest_centroid, nearest_neighbour, ridge_mse
from metapeft.build import build
from metapeft.errors import ConfigError
from metapeft.experiment import run


def test_nearest_centroid_by_hand():
    # task 0: class means 0 and 10; queries 4 (-> 0), 6 (-> 1), 9 (-> 1, but labelled 0)
    xs = np.array([[[-1.0], [1.0], [9.0], [11.0]]])
    ys = np.array([[0, 0, 1, 1]])
    xq, yq = np.array([[[4.0], [6.0], [9.0]]]), np.array([[0, 1, 0]])
    assert nearest_centroid(xs, ys, xq, yq, 2).tolist() == [pytest.approx(2 / 3)]


def test_nearest_neighbour_by_hand():
    # support 0, 10 (class 0) and 3 (class 1): the query 1 is nearest to 0, but nearer the mean of class 1 (3)
    # than that of class 0 (5)
    xs, ys = np.array([[[0.0], [3.0], [10.0]]]), np.array([[0, 1, 0]])
    xq, yq = np.array([[[1.0], [7.0], [2.0]]]), np.array([[0, 0, 1]])
    assert nearest_neighbour(xs, ys, xq, yq).tolist() == [1.0]
    assert nearest_centroid(xs, ys, xq, yq, 2).tolist() == [pytest.approx(2 / 3)]


def test_logistic_regression_separates_separable_classes():
    xs = np.array([[[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]]])
    xq = np.array([[[0.2, 0.1], [4.9, 5.2]]])
    assert logistic_regression(xs, np.array([[0, 0, 1, 1]]), xq, np.array([[0, 1]])).tolist() == [1.0]


def test_ridge_refits_a_line():
    x = np.linspace(-1, 1, 20)[None, :, None]
    y = 3 * x + 1
    assert ridge_mse(x, y, x, y)[0] < 0.1  # alpha=1 shrinks the slope a little


def test_zero_and_support_mean_by_hand(compose_cfg, tmp_path):
    metrics = run(compose_cfg("mode=tiny", "baselines=[zero,support_mean]"), tmp_path)
    episodes = build(compose_cfg("mode=tiny")).task.sample("test", 6, 5, np.random.default_rng([0, 2, 5]))
    ys, yq = np.array(episodes.ys)[..., 0], np.array(episodes.yq)[..., 0]
    baselines = metrics["evaluation"]["shots"]["5"]["baselines"]
    assert list(baselines) == ["zero", "support_mean"]
    np.testing.assert_allclose(baselines["zero"]["per_task"], (yq ** 2).mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(baselines["support_mean"]["per_task"],
                               ((yq - ys.mean(axis=1, keepdims=True)) ** 2).mean(axis=1), rtol=1e-5)


def test_a_classification_run_reports_every_baseline_and_the_paired_difference_to_the_best(tmp_path):
    result = run_cli(f"hydra.run.dir={tmp_path}", "task=digits", "mode=tiny", "pretrain.iterations=20",
                     f"pretrain.cache_dir={tmp_path / 'cache'}", "progress=false")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for shot in metrics["evaluation"]["shots"].values():
        assert set(shot["baselines"]) == {"nearest_centroid", "nearest_neighbour", "logistic_regression",
                                          "prototype", "linear_probe", "plain_init", "finetune", "finetune_head"}
        for baseline in shot["baselines"].values():
            assert len(baseline["per_task"]) == 6 and baseline["ci95"] >= 0
        best = shot["versus_best_baseline"]
        means = {name: b["mean"] for name, b in shot["baselines"].items()}
        assert means[best["baseline"]] == max(means.values())
        ours, theirs = (np.array(x["per_task"]) for x in (shot["meta_learned"], shot["baselines"][best["baseline"]]))
        assert best["difference"] == pytest.approx(float((ours - theirs).mean()))
    assert f"the best baseline, {best['baseline']}" in result.stdout + result.stderr  # the console names it
    # pretrain.iterations=20 stops pretraining at its cap, long before validation could stall: the run says so
    assert any("reached its cap of 20 iterations" in note for note in metrics["baselines_below_full_strength"])
    assert "baseline below full strength" in result.stdout + result.stderr
    # mode=tiny cuts the tuned baselines' budgets: the run names them
    cut = next(note for note in metrics["baselines_below_full_strength"] if note.startswith("mode=tiny cuts"))
    assert "finetune, finetune_head from 4 learning rates x steps [1, 2]" in cut and "linear_probe" in cut
    for name, key in (("linear_probe", "C"), ("logistic_regression", "C"), ("finetune", "learning_rate")):
        choice = shot["baselines"][name]["chosen_on_validation"]  # every tuned baseline records its choice
        assert choice[key] is not None and choice["num_val_tasks"] == 4 and "at_grid_edge" in choice


@pytest.mark.parametrize("overrides", [["baselines=[nearest_centroid]"], ["task=digits", "baselines=[zero]"],
                                       ["baselines=[best]"]])
def test_a_baseline_that_does_not_apply_is_refused_before_training(compose_cfg, tmp_path, overrides):
    with pytest.raises(ConfigError) as error:
        run(compose_cfg("mode=tiny", *overrides), tmp_path)
    assert error.value.key == "baselines" and not (tmp_path / "history.csv").exists()


def test_pretrained_features_are_embedded_a_chunk_of_tasks_at_a_time_with_the_same_result(compose_cfg, tmp_path):
    """The prototypes and the linear probe read features of every evaluation task: embedded evaluation.chunk_size
    tasks at a time, as the curves adapt them, so a large evaluation on a large encoder fits in memory."""
    from metapeft.baselines import make_baselines
    from metapeft.build import initial_state, pretrained

    scores, traces = {}, {}
    for chunk in (2, 200):
        exp = build(compose_cfg("task=digits", "peft=lora", "pretrain.iterations=20", f"evaluation.chunk_size={chunk}",
                                f"pretrain.cache_dir={tmp_path}", "baselines=[prototype,linear_probe]"))
        start = initial_state(exp)
        episodes = exp.task.sample("test", 7, 5, np.random.default_rng(0))
        features, traces[chunk] = exp.model.features, 0

        def counted(*args, features=features, chunk=chunk):  # vmap traces it once per call: once per chunk
            traces[chunk] += 1
            return features(*args)

        exp.model.features = counted
        chosen = make_baselines(exp, start.plain, start.frozen, lambda: pretrained(exp)[0])
        scores[chunk] = {name: baseline(episodes) for name, baseline in chosen.items()}
    # support and query sets of 7 test tasks (4 chunks of 2, or 1 of 200) and of the probe's 20 validation tasks
    assert exp.cfg.mode.baseline_val_tasks == 20 and traces == {2: 2 * 4 + 2 * 10, 200: 2 * 1 + 2 * 1}
    np.testing.assert_allclose(scores[2]["prototype"], scores[200]["prototype"], atol=1e-6)
    np.testing.assert_allclose(scores[2]["linear_probe"][0], scores[200]["linear_probe"][0], atol=1e-6)


def test_a_read_out_takes_the_grid_value_validation_prefers_and_ties_go_to_the_default():
    from metapeft.probes import tuned

    validation, test = (np.array([1.0]),), (np.array([2.0]),)
    score = lambda value, x: x * {0.1: 0.5, 1.0: 0.6, 10.0: 0.7}[value]  # per task: here one task
    scores, facts = tuned(score, [0.1, 1.0, 10.0], validation, test, True, "C")
    choice = facts["chosen_on_validation"]
    assert scores.tolist() == [1.4] and choice["C"] == 10.0 and choice["at_grid_edge"]
    assert choice["val_grid"] == {"0.1": 0.5, "1": 0.6, "10": pytest.approx(0.7)}
    _, facts = tuned(score, [0.1, 1.0, 10.0], validation, test, False, "alpha")  # lower is better
    assert facts["chosen_on_validation"]["alpha"] == 0.1
    _, facts = tuned(lambda value, x: x, [0.01, 1.0, 100.0], validation, test, True, "C")  # all tie
    assert facts["chosen_on_validation"] == {**facts["chosen_on_validation"], "C": 1.0, "at_grid_edge": False}
    nan = lambda value, x: x * (np.nan if value == 1.0 else 0.1)  # a value that failed is never chosen
    assert tuned(nan, [0.1, 1.0], validation, test, True, "C")[1]["chosen_on_validation"]["C"] == 0.1


def test_the_tuned_linear_probe_is_logistic_regression_at_the_chosen_c_on_the_test_episodes(compose_cfg, tmp_path):
    from metapeft.baselines import l2_normalized, make_baselines
    from metapeft.build import initial_state, pretrained

    exp = build(compose_cfg("task=digits", "peft=lora", "mode=tiny", "pretrain.iterations=20",
                            f"pretrain.cache_dir={tmp_path}", "baselines=[linear_probe]", "probe.logistic_c=[0.001,1]"))
    start = initial_state(exp)
    episodes = exp.task.sample("test", 6, 1, np.random.default_rng(0))
    scores, facts = make_baselines(exp, start.plain, start.frozen, lambda: pretrained(exp)[0])["linear_probe"](episodes)
    backbone = pretrained(exp)[0]
    embed = lambda x: np.stack([np.asarray(exp.model.features(backbone, x[t])).reshape(x.shape[1], -1)
                                for t in range(x.shape[0])])
    c = facts["chosen_on_validation"]["C"]
    expected = logistic_regression(l2_normalized(embed(episodes.xs)), episodes.ys, l2_normalized(embed(episodes.xq)),
                                   episodes.yq, c)
    np.testing.assert_allclose(scores, expected)
    assert set(facts["chosen_on_validation"]["val_grid"]) == {"0.001", "1"}


def test_adam_over_trees_is_adam_with_bias_correction():
    import mlx.core as mx
    import mlx.optimizers as optim

    from metapeft.finetune import adam_step

    weights = {"w": mx.array([1.0, -2.0, 0.5])}
    reference = optim.Adam(learning_rate=0.01, bias_correction=True)
    reference.init(weights)
    expected, ours = weights, weights
    m = v = {"w": mx.zeros((3,))}
    for step in range(1, 4):
        grads = {"w": mx.array([0.3, -0.1, 2.0]) * step}
        expected = reference.apply_gradients(grads, expected)
        ours, m, v = adam_step(ours, m, v, grads, mx.array(float(step)), 0.01)
    np.testing.assert_allclose(np.array(ours["w"]), np.array(expected["w"]), rtol=1e-6)


def test_the_finetune_baseline_is_tuned_on_validation_tasks_then_scores_the_test_episodes(compose_cfg, tmp_path):
    from metapeft.build import initial_state
    from metapeft.finetune import finetune_scores, task_stepper

    cfg = compose_cfg("task=digits", "peft=lora", "mode=tiny", "pretrain.iterations=20", "shots.eval=[5]",
                      f"pretrain.cache_dir={tmp_path / 'cache'}", "baselines=[finetune]")
    metrics = run(cfg, tmp_path / "run")
    finetune = metrics["evaluation"]["shots"]["5"]["baselines"]["finetune"]
    chosen = finetune["chosen_on_validation"]
    assert chosen["learning_rate"] in cfg.finetune.learning_rates and chosen["steps"] in cfg.mode.finetune_steps
    assert len(chosen["val_grid"]) == len(cfg.finetune.learning_rates) and chosen["num_val_tasks"] == 4
    best = chosen["val_grid"][f"{chosen['learning_rate']:g}"][str(chosen["steps"])]
    assert best == max(score for row in chosen["val_grid"].values() for score in row.values())
    # the chosen setting, replayed by hand on the run's test episodes, gives the recorded per-task accuracies
    exp = build(cfg)
    start = initial_state(exp)
    episodes = exp.task.sample("test", 6, 5, np.random.default_rng([0, 2, 5]))
    by_hand = finetune_scores(task_stepper(lambda w, x, y: exp.loss(w, start.frozen, x, y)),
                              lambda w, x, y: exp.metric(w, start.frozen, x, y), start.plain, episodes,
                              chosen["learning_rate"], [chosen["steps"]], 200)
    np.testing.assert_allclose(finetune["per_task"], by_hand[:, 0], atol=1e-6)


def test_without_peft_the_whole_pretrained_network_and_its_head_alone_are_fine_tuned(compose_cfg, tmp_path):
    from metapeft.baselines import applicable

    assert {"finetune", "finetune_head"} <= set(applicable(build(compose_cfg("task=digits"))))
    assert "finetune_head" not in applicable(build(compose_cfg("task=digits", "peft=lora")))
    assert "oracle" not in applicable(build(compose_cfg("task=digits", "peft=lora")))
    assert "oracle" in applicable(build(compose_cfg("task=low_rank", "model=linear", "peft=lora")))


def test_a_fine_tuning_setting_that_diverges_is_never_chosen(monkeypatch):
    import metapeft.finetune as finetune

    scores = {0.1: np.array([[np.nan, np.nan]]), 0.01: np.array([[3.0, 2.0]])}  # MSE: lower is better
    monkeypatch.setattr(finetune, "finetune_scores", lambda step, metric, start, e, lr, *rest: scores[lr])
    chosen = finetune.choose_on_validation(None, None, {}, [None], [0.1, 0.01], [10, 20], 1, higher_is_better=False)
    assert (chosen["learning_rate"], chosen["steps"], chosen["val_metric"]) == (0.01, 20, 2.0)


def test_ridge_scores_every_output_of_a_multi_output_task():
    x = np.linspace(-1, 1, 20)[None, :, None]
    y = 3 * x + 1
    both = np.concatenate([y, 10 * y], axis=-1)  # task=low_rank's targets have task.dim outputs
    expected = (ridge_mse(x, y, x, y)[0] + ridge_mse(x, 10 * y, x, 10 * y)[0]) / 2
    assert ridge_mse(x, both, x, both)[0] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("mode", ["tiny", "quick", "full"])
def test_a_mode_that_cuts_the_baselines_budgets_says_so_and_full_mode_does_not(compose_cfg, mode):
    from metapeft.experiment import below_full_strength

    cfg = compose_cfg("task=digits", f"mode={mode}")
    choices = {"finetune": {"learning_rate": 0.01, "steps": 10, "at_grid_edge": False},
               "linear_probe": {"C": 1.0, "at_grid_edge": False}}
    evaluation = {"shots": {"1": {"baselines": {name: {"chosen_on_validation": c} for name, c in choices.items()},
                                  "meta_learned": {}}}}
    notes = below_full_strength(cfg, {"stopped": "no better validation in 8 validations"}, evaluation)
    if mode == "full":
        assert notes == [] and cfg.mode.baseline_val_tasks == cfg.mode.num_val_tasks
    else:
        assert len(notes) == 1 and notes[0].startswith(f"mode={mode} cuts") and "finetune from" in notes[0]
        assert f"on {cfg.mode.baseline_val_tasks} validation tasks" in notes[0]


def test_a_baseline_the_mode_skips_for_its_cost_is_left_out_said_and_runs_when_named(compose_cfg):
    from metapeft.baselines import chosen, skipped_for_cost
    from metapeft.experiment import below_full_strength

    skipping = build(compose_cfg("task=digits", "mode=quick", "mode.skipped_baselines=[finetune]"))
    assert "finetune" not in chosen(skipping) and "linear_probe" in chosen(skipping)
    assert skipped_for_cost(skipping) == ["finetune"]
    notes = below_full_strength(skipping.cfg, {}, {"shots": {}}, skipped_for_cost(skipping))
    assert notes[0].startswith("mode=quick left out finetune for its cost")
    named = build(compose_cfg("task=digits", "mode=quick", "mode.skipped_baselines=[finetune]",
                              "baselines=[finetune,prototype]"))
    assert chosen(named) == ("finetune", "prototype") and skipped_for_cost(named) == []
    with pytest.raises(ConfigError) as error:
        chosen(build(compose_cfg("task=digits", "mode.skipped_baselines=[fine_tune]")))
    assert error.value.key == "mode.skipped_baselines" and "'finetune'" in str(error.value)
