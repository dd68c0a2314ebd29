"""The benchmark's peers compute the project's own meta-loss, and the benchmark measures the project without them."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from mlx.utils import tree_map

from benchmarks import common as bench_setup
from benchmarks import encoder as bench_encoder
from benchmarks import steps as bench
from benchmarks.peers import PEERS


@pytest.mark.parametrize("peer", sorted(PEERS))
@pytest.mark.parametrize("workload", ["a_sinusoid_maml_1step", "c_digits_lora_maml", "d_digits_lora_reptile"])
def test_each_peer_computes_our_meta_loss(peer, workload):
    modules, make_peer = PEERS[peer]
    for module in modules:
        pytest.importorskip(module)
    exp, meta, frozen = bench_setup.setup([*bench.WORKLOADS[workload], "algorithm.meta_batch_size=2"])
    batch = exp.task.sample("train", 2, exp.cfg.shots.train, np.random.default_rng(0))
    ours = exp.learner.meta_value_and_grad(meta, frozen, batch)[0].item()
    to_numpy = lambda tree: tree_map(lambda a: np.array(a), tree)
    theirs, step, sync = make_peer(bench_setup.peer_spec(exp), to_numpy(meta["weights"]), to_numpy(frozen),
                                   [tuple(np.array(a) for a in batch)])
    assert theirs == pytest.approx(ours, rel=1e-4)
    assert np.isfinite(sync(step(0)))


def test_missing_peers_are_reported_and_the_project_still_measured(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    result = bench.time_workload("a_sinusoid_maml_1step", bench.WORKLOADS["a_sinusoid_maml_1step"], repeats=1,
                                 seconds=0.2)
    assert result["ms_per_iteration"] > 0
    assert result["peers"] == {name: "unavailable: pip install -e '.[bench]'" for name in PEERS}


@pytest.mark.parametrize("variant", ["maml_task_by_task", "reptile"])
def test_the_pytorch_peer_computes_our_meta_loss_on_the_encoder(tmp_path, variant):
    """``python -m benchmarks encoder``'s peer: BERT under Hugging Face's names with LoRA (a tiny random BERT here),
    second-order MAML task by task or Reptile vmapped, from our parameters and batches."""
    pytest.importorskip("torch")
    from benchmarks.peers import torch_peer
    from helpers import tiny_bert

    overrides = [*bench_encoder.ENCODER, *bench_encoder.ENCODER_VARIANTS[variant],
                 f"model.path={tiny_bert(tmp_path / 'bert')}", "algorithm.num_inner_steps=2", "model.max_length=16",
                 "algorithm.meta_batch_size=2"]
    exp, meta, frozen = bench_setup.setup(overrides)
    batch = exp.task.sample("train", 2, 5, np.random.default_rng(0))
    ours = exp.learner.meta_value_and_grad(meta, frozen, batch)[0].item()
    to_numpy = lambda tree: tree_map(lambda a: np.array(a), tree)
    theirs, step, sync = torch_peer(bench_setup.peer_spec(exp), to_numpy(meta["weights"]), to_numpy(frozen),
                                    [tuple(np.array(a) for a in batch)])
    assert theirs == pytest.approx(ours, rel=1e-4)
    assert sync(step(0)) == pytest.approx(ours, rel=1e-4)  # the task-by-task step's loss is the same meta-loss


def test_the_benchmarks_command_line_refuses_an_unknown_workload(capsys):
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit):
        main(["--workloads", "z_nothing", "steps"])
    assert "--workloads: unknown ['z_nothing']" in capsys.readouterr().err


@pytest.mark.parametrize("workload", ["protonet", "fomaml"])
def test_the_pytorch_peer_computes_our_loss_on_resnet12(tmp_path, workload):
    """``python -m benchmarks resnet12``'s peer (F.conv2d, batch statistics, torch.func.grad for the inner steps),
    on a narrow ResNet-12 over 16x16 images: its first step's loss is ours, from our parameters and batches."""
    pytest.importorskip("torch")
    from benchmarks import resnet12 as bench_resnet12

    root = bench_resnet12.mini_imagenet_layout(tmp_path / "mini", size=16)
    overrides = [*bench_resnet12.COMMON, *bench_resnet12.RESNET12_WORKLOADS[workload], f"task.root={root}",
                 f"task.cache_dir={tmp_path / 'cache'}", "task.image_size=16", "model.channels=[4,6,8,8]",
                 "task.num_query=3"]
    exp, meta, frozen = bench_setup.setup(overrides)
    batch = exp.task.sample("train", 1, 1, np.random.default_rng(0))
    ours = exp.learner.meta_value_and_grad(meta, frozen, batch)[0].item()
    step, sync = bench_resnet12.torch_resnet12_peer(exp, tree_map(lambda a: np.array(a), meta["weights"]),
                                                     [tuple(np.array(a) for a in batch)])
    assert sync(step(0)) == pytest.approx(ours, rel=1e-4)


def test_a_timed_compiled_step_reports_the_first_meta_loss():
    """The timing both the encoder and the ResNet-12 benchmarks use: the runner's compiled step, one warm-up."""
    exp, meta, frozen = bench_setup.setup([*bench.WORKLOADS["c_digits_lora_maml"], "algorithm.meta_batch_size=2"])
    batches = [exp.task.sample("train", 2, exp.cfg.shots.train, np.random.default_rng(i)) for i in range(2)]
    first = exp.learner.meta_value_and_grad(meta, frozen, batches[0])[0].item()
    result = bench_setup.timed_steps(bench_setup.our_compiled_step(exp, meta, frozen, batches), repeats=1)
    assert result["first_loss"] == pytest.approx(first, rel=1e-5)
    assert result["ms_per_iteration"] > 0 and result["max_rss_mb"] > 0


@pytest.mark.parametrize("algorithm", ["maml", "fomaml"])
def test_the_torch_func_peer_computes_our_meta_gradient_on_a_causal_lm(tmp_path, algorithm):
    """``python -m benchmarks causal-lm``'s peer (transformers' Qwen2 with peft's LoRA, torch.func), on the tiny
    shape: its meta-loss and meta-gradient are ours, second order for MAML and first order for FOMAML."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from benchmarks import causal_lm as bench_lm
    from metapeft.export import PREFIX

    model, tasks = bench_lm.write_inputs(tmp_path, "tiny", length=24)
    exp, meta, frozen = bench_setup.setup([*bench_lm.overrides(model, tasks, algorithm), "model.max_length=24"])
    meta = tree_map(lambda a: a + 0.05, meta)  # B away from zero, so that second order differs from first
    batch = exp.task.sample("train", 2, 2, np.random.default_rng(0))
    loss, grads = exp.learner.meta_value_and_grad(meta, frozen, batch)[:2]
    bench_lm.save_weights(exp, frozen, meta, tmp_path / "weights", model)
    _, meta_gradient = bench_lm.torch_peer(exp, tmp_path / "weights", [tuple(np.array(a) for a in batch)], algorithm)
    theirs_loss, theirs = meta_gradient(0)
    assert theirs_loss == pytest.approx(loss.item(), rel=1e-4)
    ours = exp.peft.hf_adapter_tensors(grads["weights"], frozen, PREFIX)
    theirs = {k.replace(".default", ""): v.detach().numpy() for k, v in theirs.items()}
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        np.testing.assert_allclose(theirs[name], np.array(value), atol=1e-4 * np.abs(np.array(value)).max())
