"""The field's few-shot benchmarks, read from the layouts their public copies have (fixtures written here: nothing
is downloaded), and ResNet-12."""
from __future__ import annotations

import pickle

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map
from omegaconf import OmegaConf

from helpers import cifar100_archive, class_folders, mini_imagenet_folder, run_cli
from metapeft.build import build
from metapeft.errors import ConfigError
from metapeft.models.resnet12 import ResNet12, ResNet12Config
from metapeft.tasks import decoded
from metapeft.tasks.rgb import published_split
from metapeft.trees import count

SMALL = ("task.num_query=2", "shots.train=1", "model=conv4")


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return cifar100_archive(tmp_path_factory.mktemp("cifar"))


def test_cifar_fs_is_the_published_64_16_20_class_split_of_the_archive(compose_cfg, cifar_root):
    task = build(compose_cfg("task=cifar_fs", f"task.root={cifar_root}", *SMALL, "shots.eval=[1,3]")).task
    assert [len(task.class_images[s]) for s in ("train", "val", "test")] == [64, 16, 20]
    split = published_split("cifar_fs")
    assert task.class_names["test"] == split["test"] and "whale" in task.class_names["test"]
    assert not set(task.class_names["train"]) & set(task.class_names["test"])
    assert all(images.shape == (6, 32, 32, 3) for images in task.class_images["train"])  # train + test images pooled
    assert all((images[:, 0, 0] == [255, 0, 0]).all() for images in task.class_images["val"])  # channels in order
    episodes = task.sample("test", 3, 1, np.random.default_rng(0))
    assert episodes.xs.shape == (3, 5, 32, 32, 3) and episodes.xs.dtype == mx.float32
    pixels = task.normalized(task.pretraining_images).reshape(-1, 3)  # normalized by the meta-train statistics
    np.testing.assert_allclose(pixels.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(pixels.std(axis=0), 1, atol=1e-3)


def test_fc100_splits_by_superclass_and_counts_a_superclass_as_one_source(compose_cfg, cifar_root):
    task = build(compose_cfg("task=fc100", f"task.root={cifar_root}", *SMALL, "shots.eval=[1]")).task
    assert [len(task.class_images[s]) for s in ("train", "val", "test")] == [60, 20, 20]
    assert {"baby", "bee", "whale", "fox"} <= set(task.class_names["test"])  # people, insects, aquatic, medium
    assert sorted(np.unique(task.class_sources["test"])) == [0, 1, 2, 3]
    _, drawn = task.sample_with_classes("test", 4, 1, np.random.default_rng(0))
    assert drawn.sources.max() <= 3  # the intervals see 4 superclasses, not 20 independent classes


def test_a_damaged_or_missing_archive_is_refused_naming_the_file(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match="cifar-100-python is missing") as error:
        build(compose_cfg("task=cifar_fs", f"task.root={tmp_path}", "model=conv4"))
    assert error.value.key == "task.root"
    root = cifar100_archive(tmp_path / "a", 1, 1)
    (root / "cifar-100-python" / "meta").unlink()
    with pytest.raises(ConfigError, match="meta is missing"):
        build(compose_cfg("task=cifar_fs", f"task.root={root}", "model=conv4"))
    (root / "cifar-100-python" / "meta").write_bytes(pickle.dumps({"label_names": []}))
    with pytest.raises(ConfigError, match="no 'fine_label_names' entry"):
        build(compose_cfg("task=cifar_fs", f"task.root={root}", "model=conv4"))
    (root / "cifar-100-python" / "meta").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="not a readable CIFAR-100 pickle"):
        build(compose_cfg("task=cifar_fs", f"task.root={root}", "model=conv4"))


def test_a_class_with_fewer_images_than_k_plus_q_is_refused_naming_it(compose_cfg, cifar_root):
    with pytest.raises(ConfigError, match=r"class \w+ \(train split\) has 6 images") as error:
        build(compose_cfg("task=cifar_fs", f"task.root={cifar_root}", "task.num_query=5", "shots.eval=[1,5]",
                          "model=conv4"))
    assert error.value.key == "shots"


def test_mini_imagenet_reads_the_csv_layout_and_decodes_once(compose_cfg, tmp_path, monkeypatch):
    root = mini_imagenet_folder(tmp_path / "mini")
    args = ("task=mini_imagenet", f"task.root={root}", "task.image_size=12", *SMALL, "shots.eval=[1,3]",
            f"task.cache_dir={tmp_path / 'cache'}")
    task = build(compose_cfg(*args)).task
    assert [len(task.class_images[s]) for s in ("train", "val", "test")] == [6, 5, 5]
    assert task.class_names["val"][0] == "n00000006" and task.class_images["val"][0].shape == (6, 12, 12, 3)
    monkeypatch.setattr(decoded, "read_rgb", lambda *a: pytest.fail("decoded again instead of read from the cache"))
    again = build(compose_cfg(*args)).task
    np.testing.assert_array_equal(again.class_images["test"][4], task.class_images["test"][4])


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "val.csv").unlink(), "val.csv is missing"),
    (lambda root: (root / "test.csv").write_text("file,class\nx.jpg,n1\n"), "header 'filename,label'"),
    (lambda root: (root / "train.csv").write_text((root / "train.csv").read_text() + "gone.jpg,n00000000\n"),
     "missing, e.g. .*gone.jpg"),
    (lambda root: (root / "images" / "n0000000000000001.jpg").write_bytes(b"not a jpeg"), "not a readable image"),
])
def test_a_malformed_mini_imagenet_folder_is_refused_naming_the_file(compose_cfg, tmp_path, damage, message):
    root = mini_imagenet_folder(tmp_path / "mini", classes=(2, 2, 2), per_class=3, size=8)
    damage(root)
    with pytest.raises(ConfigError, match=message) as error:
        build(compose_cfg("task=mini_imagenet", f"task.root={root}", "task.image_size=8", "task.num_query=1",
                          "shots.train=1", "shots.eval=[1]", f"task.cache_dir={tmp_path / 'cache'}", "model=conv4"))
    assert error.value.key == "task.root"


def test_resnet12_has_the_published_parameter_count_and_its_convolutions_are_convolutions():
    model = ResNet12(OmegaConf.structured(ResNet12Config()), (84, 84, 3), 5)
    params = model.init(mx.random.key(0))
    body = {k: v for k, v in params.items() if k != "head"}
    conv_biases = sum(block[name]["bias"].size for block in body["blocks"]
                      for name in ("conv1", "conv2", "conv3", "shortcut"))
    assert count(body) - conv_biases == 12_424_320  # MetaOptNet's / RFS's ResNet-12: "12.4M"
    assert model.feature_dim == 640 and model(params, mx.zeros((2, 84, 84, 3))).shape == (2, 5)
    # a block's first convolution, against MLX's own conv2d on the same weights
    small = ResNet12(OmegaConf.structured(ResNet12Config(channels=[4, 6])), (8, 8, 3), 2)
    weights = small.init(mx.random.key(1))["blocks"][0]["conv1"]
    x = mx.random.normal((2, 8, 8, 3), key=mx.random.key(2))
    from metapeft.models.conv4 import patches_3x3

    kernel = weights["weight"].reshape(3, 3, 3, 4).transpose(3, 0, 1, 2)  # patches' rows: (dy, dx, channel)
    np.testing.assert_allclose(np.array(small.linear(weights, patches_3x3(x))),
                               np.array(mx.conv2d(x, kernel, padding=1) + weights["bias"]), rtol=1e-4, atol=1e-5)


def test_resnet12_meta_gradient_matches_finite_differences_under_vmap():
    """Second-order MAML differentiates through an inner step of a vmapped ResNet-12 (batch norm included); in
    float64, as max-pooling and leaky ReLU make float32 differences too rough to check against."""
    model = ResNet12(OmegaConf.structured(ResNet12Config(channels=[3, 4])), (8, 8, 3), 2)
    params = tree_map(lambda a: a.astype(mx.float64), model.init(mx.random.key(0)))
    xs, xq = (mx.random.normal((2, 4, 8, 8, 3), key=mx.random.key(k)).astype(mx.float64) for k in (1, 2))
    ys = yq = mx.array([[0, 1, 0, 1], [1, 0, 1, 0]])

    def loss(p, x, y):
        logits = model(p, x)
        return mx.mean(mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, y[..., None], axis=-1)[..., 0])

    def meta_loss(scale):
        def task(a, b, c, d):
            p = {**params, "head": {**params["head"], "weight": params["head"]["weight"] * scale}}
            adapted = tree_map(lambda w, g: w - 0.1 * g, p, mx.grad(loss)(p, a, b))
            return loss(adapted, c, d)

        return mx.mean(mx.vmap(task)(xs, ys, xq, yq))

    with mx.stream(mx.cpu):  # float64 is a CPU type in MLX
        one, h = mx.array(1.0, dtype=mx.float64), 1e-3
        grad = mx.grad(meta_loss)(one).item()
        numeric = (meta_loss(one + h).item() - meta_loss(one - h).item()) / (2 * h)
    assert grad == pytest.approx(numeric, rel=1e-3)


@pytest.mark.parametrize("extra", [
    pytest.param(["algorithm=protonet"], marks=pytest.mark.slow),
    ["algorithm=maml", "algorithm.num_inner_steps=1", "peft=lora", "peft.target_modules=[conv2,conv3]"]])
def test_a_run_on_cifar_fs_with_resnet12_trains_evaluates_and_reports(tmp_path, cifar_root, extra):
    result = run_cli(f"hydra.run.dir={tmp_path / 'run'}", "task=cifar_fs", f"task.root={cifar_root}", "model=resnet12",
                     "model.channels=[4,8]", "mode=tiny", "task.num_query=2", "shots.train=1", "shots.eval=[1]",
                     "pretrain.iterations=4", "pretrain.val_interval=2", "pretrain.num_val_tasks=4",
                     f"pretrain.cache_dir={tmp_path / 'cache'}", "evaluation.curve_steps=1", "mode.num_eval_tasks=4",
                     "baselines=[prototype,linear_probe,finetune]", "progress=false", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"linear_probe", "finetune"} <= set(metrics["evaluation"]["shots"]["1"]["baselines"])


def test_tiered_imagenet_reads_one_folder_per_class_per_split(compose_cfg, tmp_path):
    layout = {split: [f"n{split}{i:04d}" for i in range(count)] for split, count in
              (("train", 4), ("val", 2), ("test", 3))}
    root = class_folders(tmp_path / "tiered", layout)
    args = ("task=tiered_imagenet", f"task.root={root}", "task.image_size=8", "task.n_way=2", *SMALL,
            "shots.eval=[1]", f"task.cache_dir={tmp_path / 'cache'}")
    task = build(compose_cfg(*args)).task
    assert task.class_names == layout and task.class_images["test"][2].shape == (4, 8, 8, 3)
    (root / "test" / "ntest0001" / "0.jpg").unlink()
    for image in (root / "test" / "ntest0001").iterdir():
        image.unlink()
    with pytest.raises(ConfigError, match="ntest0001 holds no images"):
        build(compose_cfg(*args))
    (root / "test" / "ntest0001").rmdir()
    (root / "val" / "nval0000").rename(root / "nval0000")
    with pytest.raises(ConfigError, match=r"val holds 1 class folder"):
        build(compose_cfg(*args))


def test_cub_is_chen_et_al_s_100_50_50_split_of_the_class_folders(compose_cfg, tmp_path):
    layout = {"CUB_200_2011/images": [f"{i:03d}.Bird_{i}" for i in range(1, 201)]}
    root = class_folders(tmp_path / "cub", layout, per_class=3, size=4)
    args = ("task=cub", f"task.root={root}", "task.image_size=8", "task.num_query=2", "shots.train=1",
            "shots.eval=[1]", f"task.cache_dir={tmp_path / 'cache'}", "model=mlp")
    task = build(compose_cfg(*args)).task
    assert [len(task.class_names[s]) for s in ("train", "val", "test")] == [100, 50, 50]
    # the sorted folders' i-th (from 0): train if i % 2 == 0, val if i % 4 == 1, test if i % 4 == 3
    assert task.class_names["train"][:2] == ["001.Bird_1", "003.Bird_3"]
    assert task.class_names["val"][:2] == ["002.Bird_2", "006.Bird_6"]
    assert task.class_names["test"][-1] == "200.Bird_200"
    (root / "CUB_200_2011" / "images" / "006.Bird_6").rename(root / "elsewhere")
    with pytest.raises(ConfigError, match=r"lacks the class folders of ids \[6\]"):
        build(compose_cfg(*args))


def test_augmentation_changes_training_images_only_and_keeps_their_content(compose_cfg, cifar_root):
    from metapeft.tasks.rgb import augmented

    plain, augmenting = (build(compose_cfg("task=cifar_fs", f"task.root={cifar_root}", *SMALL, "shots.eval=[1]",
                                           f"task.augment={flag}")).task for flag in ("false", "true"))
    for split in ("val", "test"):  # never meta-validation or meta-test images
        a, b = (t.sample(split, 2, 1, np.random.default_rng(0)) for t in (plain, augmenting))
        np.testing.assert_array_equal(np.array(a.xq), np.array(b.xq))
    a, b = (t.sample("train", 2, 1, np.random.default_rng(0)) for t in (plain, augmenting))
    assert not np.allclose(np.array(a.xs), np.array(b.xs))
    grey = np.full((5, 32, 32, 3), 0.5, np.float32)  # no jitter: a shifted, maybe flipped copy, padded with zeros
    moved = augmented(grey, np.random.default_rng(0), jitter=0.0)
    assert set(np.unique(moved)) <= {0.0, 0.5} and (moved[:, 4:28, 4:28] == 0.5).all()
