"""The glyph benchmark: generated from matplotlib's fonts, split by alphabet, deterministic, cached, readable as an
image folder; small settings keep generation to a few seconds."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from metapeft import glyph_benchmark
from metapeft.build import build
from metapeft.errors import ConfigError
from metapeft.experiment import run

SMALL = glyph_benchmark.Settings(image_size=16, instances=6, max_characters_per_alphabet=12,
                                 min_characters_per_alphabet=10, evaluation_fraction=0.3, seed=0)
TASK = ["task=glyphs", "task.image_size=16", "task.instances=6", "task.max_characters_per_alphabet=12",
        "task.num_query=2", "shots.train=1", "shots.eval=[1,2]"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    glyph_benchmark.ensure(path, SMALL)
    return path


def test_alphabets_are_split_whole_and_characters_are_distinct_nonempty_glyphs(cache):
    directory = glyph_benchmark.ensure(cache, SMALL)
    manifest = json.loads((directory / "manifest.json").read_text())
    alphabets = manifest["alphabets"]
    assert len(alphabets) >= 20
    assert all(SMALL.min_characters_per_alphabet <= a["characters"] <= 12 for a in alphabets.values())
    on_disk = {part: {p.name for p in (directory / f"images_{part}").iterdir()}
               for part in ("background", "evaluation")}
    assert on_disk["background"] and on_disk["evaluation"] and not on_disk["background"] & on_disk["evaluation"]
    assert on_disk["evaluation"] == {n.replace(" ", "_") for n, a in alphabets.items() if a["part"] == "evaluation"}
    parts = glyph_benchmark.load(directory)
    images = np.stack([*parts["background"].values(), *parts["evaluation"].values()])
    assert images.shape[1:] == (6, 16, 16) and 0.0 <= images.min() and images.max() <= 1.0
    assert (images.reshape(len(images), 6, -1).max(axis=2) > 0.2).all()  # every instance has ink
    first = {images[i, 0].tobytes() for i in range(len(images))}
    assert len(first) == len(images)
    assert manifest["characters"]["evaluation"] >= 0.3 * len(images)


def test_generation_is_deterministic_and_done_once(cache, tmp_path):
    directory = glyph_benchmark.ensure(cache, SMALL)
    stamp = os.stat(directory / "arrays.npz").st_mtime_ns
    assert glyph_benchmark.ensure(cache, SMALL) == directory
    assert os.stat(directory / "arrays.npz").st_mtime_ns == stamp
    again = glyph_benchmark.ensure(tmp_path, SMALL)
    with np.load(directory / "arrays.npz") as a, np.load(again / "arrays.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in ("images", "names", "parts"))
    other_seed = glyph_benchmark.ensure(tmp_path, glyph_benchmark.Settings(**{**SMALL.__dict__, "seed": 1}))
    assert other_seed != directory.name and other_seed.name != again.name


def test_a_damaged_cached_benchmark_is_generated_again_not_a_failed_run(cache, tmp_path):
    cached = glyph_benchmark.ensure(cache, SMALL)
    intact = (cached / "arrays.npz").read_bytes()
    directory = tmp_path / cached.name
    shutil.copytree(cached, directory)
    (directory / "arrays.npz").write_bytes(intact[: len(intact) // 2])
    again, parts = glyph_benchmark.ensure_loaded(tmp_path, SMALL)
    assert again == directory and (again / "arrays.npz").read_bytes() == intact  # deterministic: the same arrays
    assert parts["background"] and parts["evaluation"]
    assert [p.name for p in tmp_path.iterdir() if "damaged" in p.name] == []  # the damaged copy is gone


def test_meta_test_characters_come_from_alphabets_meta_training_never_sees(compose_cfg, cache):
    task = build(compose_cfg(*TASK, f"task.cache_dir={cache}", "mode=tiny")).task
    parts = glyph_benchmark.load(glyph_benchmark.ensure(cache, SMALL))
    background = {name.split("/")[0] for name in parts["background"]}

    def alphabets(split):
        found = set()
        for images in task.class_images[split]:
            found |= {name.split("/")[0] for part in parts.values() for name, pixels in part.items()
                      if np.array_equal(pixels, images)}
        return found

    assert not alphabets("test") & background and not alphabets("val") & background
    assert len(task.class_images["val"]) + len(task.class_images["test"]) == len(parts["evaluation"])


def test_the_folder_reads_as_an_image_folder_with_the_same_classes(compose_cfg, cache):
    glyphs = build(compose_cfg(*TASK, f"task.cache_dir={cache}", "mode=tiny")).task
    folder = build(compose_cfg("task=image_folder", f"task.root={glyph_benchmark.ensure(cache, SMALL)}",
                               "task.image_size=16", "task.rotations=false", "task.val_fraction=0.33",
                               *TASK[-3:], "mode=tiny")).task
    for split in ("train", "val", "test"):
        assert len(glyphs.class_images[split]) == len(folder.class_images[split])
        assert all(np.abs(a - b).max() < 1e-6 for a, b in zip(glyphs.class_images[split], folder.class_images[split]))


def test_a_glyph_run_records_how_many_class_sets_its_tasks_came_from(compose_cfg, cache, tmp_path):
    metrics = run(compose_cfg(*TASK, f"task.cache_dir={cache}", f"pretrain.cache_dir={cache}", "mode=tiny"),
                  tmp_path / "run")
    assert metrics["status"] == "completed"
    shot = metrics["evaluation"]["shots"]["1"]
    assert shot["ci95_method"] == "delete-one-class jackknife" and shot["num_sources"] == shot["num_classes"]
    assert shot["num_distinct_class_sets"] == metrics["evaluation"]["num_tasks"]  # 5-sets of ~30 classes rarely repeat


@pytest.mark.parametrize("override, key", [("task.instances=1", "task.instances"),
                                           ("task.max_characters_per_alphabet=5", "task.max_characters_per_alphabet"),
                                           ("task.evaluation_fraction=1.0", "task.evaluation_fraction")])
def test_impossible_generation_settings_are_refused_naming_the_key(compose_cfg, tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        build(compose_cfg(*TASK, f"task.cache_dir={tmp_path}", override, "mode=tiny"))
    assert not any(tmp_path.iterdir())  # refused before anything was generated


@pytest.mark.slow
def test_the_default_benchmark_has_omniglot_scale(compose_cfg, tmp_path):
    task = build(compose_cfg("task=glyphs", f"task.cache_dir={tmp_path}", "mode=tiny")).task
    manifest = json.loads((task.directory / "manifest.json").read_text())
    assert len(manifest["alphabets"]) >= 20 and sum(manifest["characters"].values()) >= 1500
    assert len(task.class_images["test"]) >= 200 and len(task.class_images["val"]) >= 100
    assert min(len(images) for images in task.class_images["train"]) >= 20


def test_glyph_pairs_meta_train_on_fixed_pairs_and_test_on_new_characters(compose_cfg, cache, tmp_path):
    pairs = ["task=glyph_pairs", *TASK[1:], f"task.cache_dir={cache}", "task.num_train_tasks=3"]
    task = build(compose_cfg(*pairs)).task
    assert task.num_fixed_train_tasks == 3 and len(np.unique(task.train_pairs)) == 6
    assert task.pretraining_outputs == 6 and set(task.pretraining_labels) == set(range(6))  # the pairs pooled
    fixed = task.sample_fixed(np.array([2, 0]), 1, np.random.default_rng(0))
    first = task.class_images["train"][task.train_pairs[2][0]]
    assert any(np.array_equal(np.array(fixed.xs[0, 0]), image) for image in first)  # label 0 of pair 2
    assert np.array(fixed.task).tolist() == [2, 0] and np.array(fixed.ys[0]).tolist() == [0, 1]
    _, drawn = task.sample_with_classes("test", 4, 1, np.random.default_rng(0))
    assert drawn.classes.shape == (4, 2)  # new pairs of meta-test characters, with their sources for the intervals
    metrics = run(compose_cfg(*pairs, "mode=tiny", "peft=lora", "algorithm=lora_ml", "pretrain.iterations=20",
                              f"pretrain.cache_dir={tmp_path / 'backbones'}", "evaluation.finetune_meta_learned=true",
                              "baselines=[finetune]"), tmp_path / "run")
    assert "meta_learned_finetuned" in metrics["evaluation"]["shots"]["1"]
    with pytest.raises(ConfigError, match="tells two characters apart") as error:
        build(compose_cfg(*pairs, "task.n_way=3"))
    assert error.value.key == "task.n_way"
