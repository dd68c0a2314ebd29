"""The image-folder task family on a small Omniglot-layout folder the test writes."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from metapeft.build import build
from metapeft.errors import ConfigError
from metapeft.experiment import run

TINY = ["shots.train=1", "shots.eval=[1,2]", "task.num_query=4", "task.image_size=12", "mode=tiny"]


def write_omniglot(root, alphabets=2, characters=2, images=8, seed=0):
    rng = np.random.default_rng(seed)
    for part in ("images_background", "images_evaluation"):
        for a in range(alphabets):
            for c in range(characters):
                folder = root / part / f"Alphabet_{a}" / f"character{c:02d}"
                folder.mkdir(parents=True)
                glyph = rng.random((8, 8)) > 0.5  # each character a distinct pattern, each image a noisy copy
                for i in range(images):
                    pixels = np.kron(glyph ^ (rng.random((8, 8)) > 0.9), np.ones((2, 2))) * 255
                    Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:02d}.png")
    return root


@pytest.fixture
def omniglot(tmp_path):
    return write_omniglot(tmp_path / "omniglot")


def test_episodes_from_an_image_folder(compose_cfg, omniglot, tmp_path):
    exp = build(compose_cfg("task=image_folder", f"task.root={omniglot}", *TINY))
    assert [len(exp.task.class_images[s]) for s in ("train", "val", "test")] == [16, 8, 8]  # 4 rotations each
    episodes = exp.task.sample("train", 3, 2, np.random.default_rng(0))
    assert episodes.xs.shape == (3, 10, 12, 12) and episodes.xq.shape == (3, 20, 12, 12)
    assert 0.0 <= float(episodes.xs.min()) and float(episodes.xs.max()) <= 1.0
    metrics = run(compose_cfg("task=image_folder", f"task.root={omniglot}", *TINY), tmp_path / "run")
    assert metrics["status"] == "completed" and metrics["evaluation"]["metric"] == "accuracy"


def test_bad_folders_are_refused_clearly(compose_cfg, omniglot, tmp_path):
    cases = [
        (["task=image_folder"], "give the folder"),
        (["task=image_folder", f"task.root={tmp_path / 'nowhere'}"], "does not exist"),
        (["task=image_folder", f"task.root={tmp_path}"], "expected the Omniglot layout"),
    ]
    (tmp_path / "empty" / "images_background").mkdir(parents=True)
    (tmp_path / "empty" / "images_evaluation").mkdir(parents=True)
    cases.append((["task=image_folder", f"task.root={tmp_path / 'empty'}"], "holds no images"))
    (omniglot / "images_background" / "Alphabet_0" / "character00" / "broken.png").write_text("not a png")
    cases.append((["task=image_folder", f"task.root={omniglot}"], "broken.png is not a readable image"))
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message) as error:
            build(compose_cfg(*overrides, *TINY))
        assert error.value.key == "task.root"


def test_too_few_images_per_character_names_shots(compose_cfg, omniglot):
    with pytest.raises(ConfigError, match="exceed the 8 examples") as error:
        build(compose_cfg("task=image_folder", f"task.root={omniglot}", *TINY, "shots.eval=[5]"))
    assert error.value.key == "shots"
