"""ResNet-12 at 84x84 on miniImageNet-shaped episodes (5-way 1-shot, 15 queries per class, one task per step): a
ProtoNet episode and a first-order MAML step (5 inner SGD steps), ours (the runner's own compiled meta-step) against
a PyTorch peer on the same batches from the same start. The peer is what a PyTorch user writes: ``F.conv2d``
(channels first), ``F.batch_norm`` on the batch's statistics (transductive, as ours), ``torch.func.grad`` for the
inner steps, ``torch.optim.Adam``. Each runs in a process of its own, and the peer is timed only if its loss on the
first batch equals ours. The images are random JPEGs written once in miniImageNet's layout to a temporary folder (the
timing does not depend on their content). ``python -m benchmarks resnet12`` is the command line."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import in_own_process, our_compiled_step, setup, timed_steps
from metapeft.backend import utils

COMMON = ["task=mini_imagenet", "task.image_size=84", "task.num_query=15", "model=resnet12", "peft=none",
          "shots.train=1", "shots.eval=[1]", "algorithm.meta_batch_size=1"]
RESNET12_WORKLOADS = {
    "protonet": ["algorithm=protonet"],
    "fomaml": ["algorithm=fomaml", "algorithm.num_inner_steps=5", "algorithm.inner_lr=0.01"],
}


def mini_imagenet_layout(root: Path, classes_per_split: int = 5, per_class: int = 16, size: int = 84) -> Path:
    """``root/images/*.jpg`` and ``root/{train,val,test}.csv``: random images, enough for one 5-way 1-shot episode
    with 15 queries per class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for s, split in enumerate(("train", "val", "test")):
        lines = ["filename,label"]
        for c in range(classes_per_split):
            label = f"n{s * classes_per_split + c:08d}"
            for i in range(per_class):
                name = f"{label}{i:08d}.jpg"
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "images" / name)
                lines.append(f"{name},{label}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def torch_resnet12_peer(exp, weights: dict, batches: list):
    """(step(i) -> the meta-loss before the update, sync): the workload's meta-step in eager PyTorch."""
    import torch
    import torch.nn.functional as F
    from torch.func import grad
    from torch.utils._pytree import tree_flatten, tree_map

    cfg, slope = exp.cfg.algorithm, exp.cfg.model.negative_slope
    params = tree_map(lambda a: torch.from_numpy(np.ascontiguousarray(a)), weights)
    for block in params["blocks"]:  # ours: (9 C_in, C_out) over patches ordered (row, column, channel)
        for i in (1, 2, 3):
            w = block[f"conv{i}"]["weight"]
            block[f"conv{i}"]["weight"] = w.reshape(3, 3, -1, w.shape[-1]).permute(3, 2, 0, 1).contiguous()
        block["shortcut"]["weight"] = block["shortcut"]["weight"].T.contiguous()[:, :, None, None]

    def norm(p, h):
        return F.batch_norm(h, None, None, p["scale"], p["bias"], training=True, eps=1e-5)

    def features(p, x):  # x: (n, H, W, 3) -> (n, 640)
        h = x.permute(0, 3, 1, 2)
        for b in p["blocks"]:
            out = h
            for i in (1, 2, 3):
                out = norm(b[f"norm{i}"], F.conv2d(out, b[f"conv{i}"]["weight"], b[f"conv{i}"]["bias"], padding=1))
                if i < 3:
                    out = F.leaky_relu(out, slope)
            shortcut = norm(b["shortcut_norm"], F.conv2d(h, b["shortcut"]["weight"], b["shortcut"]["bias"]))
            h = F.max_pool2d(F.leaky_relu(out + shortcut, slope), 2)
        return h.mean(dim=(2, 3))

    def cross_entropy(logits, labels):
        return F.cross_entropy(logits, labels.long())

    def protonet_loss(p, xs, ys, xq, yq):
        one_hot = F.one_hot(ys.long(), exp.task.num_classes).to(torch.float32)
        prototypes = (one_hot.T @ features(p, xs)) / one_hot.sum(0)[:, None]
        distances = ((features(p, xq)[:, None, :] - prototypes[None]) ** 2).sum(-1)
        return cross_entropy(-distances, yq)

    def loss(p, x, y):
        return cross_entropy(features(p, x) @ p["head"]["weight"] + p["head"]["bias"], y)

    def fomaml_loss(p, xs, ys, xq, yq):  # the query loss at the adapted weights; its gradient is first-order
        adapted = p
        for _ in range(cfg.num_inner_steps):
            grads = grad(loss)(adapted, xs, ys)
            adapted = tree_map(lambda w, g: (w - cfg.inner_lr * g).detach(), adapted, grads)
        adapted = tree_map(lambda w: w.requires_grad_(True), adapted)
        return adapted, loss(adapted, xq, yq)

    leaves = tree_flatten(params)[0]
    optimizer = torch.optim.Adam(leaves, lr=cfg.outer_lr)
    as_torch = [tuple(torch.from_numpy(np.asarray(a)[0]) for a in b) for b in batches]  # the one task of a batch

    def run_step(i: int):
        xs, ys, xq, yq = as_torch[i % len(as_torch)]
        optimizer.zero_grad()
        if cfg.name == "protonet":
            value = protonet_loss(params, xs, ys, xq, yq)
            value.backward()
        else:
            adapted, value = fomaml_loss(params, xs, ys, xq, yq)
            grads = torch.autograd.grad(value, tree_flatten(adapted)[0])
            for leaf, g in zip(leaves, grads):
                leaf.grad = g
        optimizer.step()
        return value.detach()

    for leaf in leaves:
        leaf.requires_grad_(True)
    return run_step, float


def resnet12_one(workload: str, implementation: str, repeats: int, root: str) -> dict:
    """One workload by ``mlx`` or ``pytorch``: ms per step after one warm-up step, the first step's loss, and the
    process's peak resident memory."""
    exp, meta, frozen = setup([*COMMON, f"task.root={root}", f"task.cache_dir={root}/cache",
                               *RESNET12_WORKLOADS[workload]])
    rng = np.random.default_rng(0)
    batches = [exp.task.sample("train", 1, 1, rng) for _ in range(repeats + 1)]
    result: dict = {"implementation": implementation, "images_per_step": int(batches[0].xs.shape[1]
                                                                            + batches[0].xq.shape[1])}
    if implementation == "mlx":
        run_step = our_compiled_step(exp, meta, frozen, batches)
    else:
        weights = utils.tree_map(lambda a: np.array(a), meta["weights"])
        peer_step, sync = torch_resnet12_peer(exp, weights, batches)
        del meta
        run_step = lambda i: sync(peer_step(i))
    result.update(timed_steps(run_step, repeats))
    return result


def resnet12_workloads(repeats: int, names: list[str]) -> dict:
    """Each workload and, where PyTorch is installed, its peer, each in a process of its own; the peer's time is
    compared only if its first loss equals ours (rtol 1e-4)."""
    def one(name: str, implementation: str, root: Path) -> dict:
        done = subprocess.run(in_own_process("resnet12", "one", name, implementation, str(repeats), str(root)),
                              capture_output=True, text=True)
        if done.returncode != 0:
            return {"failed": f"exit {done.returncode}", "stderr_tail": done.stderr[-800:]}
        return json.loads(done.stdout.splitlines()[-1])

    results = {}
    with tempfile.TemporaryDirectory(prefix="resnet12-bench-") as tmp:
        root = mini_imagenet_layout(Path(tmp))
        for name in names:
            results[name] = ours = one(name, "mlx", root)
            if importlib.util.find_spec("torch") is None:
                ours["pytorch"] = "not installed"
                continue
            theirs = one(name, "pytorch", root)
            if "failed" in ours or "failed" in theirs:
                ours["pytorch"] = theirs
            elif not np.isclose(theirs["first_loss"], ours["first_loss"], rtol=1e-4):
                ours["pytorch"] = (f"refused: its first loss {theirs['first_loss']} differs from ours "
                                   f"{ours['first_loss']}")
            else:
                ours["pytorch"] = {**theirs, "ours_over_peer": ours["ms_per_iteration"] / theirs["ms_per_iteration"]}
    return results


def print_resnet12(results: dict) -> None:
    for name, r in results.items():
        if "failed" in r:
            print(f"resnet12 {name:10s} failed: {r['failed']}\n{r.get('stderr_tail', '')}")
            continue
        peer = r.get("pytorch")
        versus = (f"; PyTorch {peer['ms_per_iteration']:.0f} ms, {peer['max_rss_mb']:.0f} MB RSS: "
                  f"ours/PyTorch {peer['ours_over_peer']:.2f}" if isinstance(peer, dict) and "ms_per_iteration" in peer
                  else f"; PyTorch: {peer}")
        print(f"resnet12 {name:10s} ({r['images_per_step']} images of 84x84 a step) {r['ms_per_iteration']:8.0f} ms "
              f"per step, {r['max_rss_mb']:6.0f} MB RSS{versus}")


if __name__ == "__main__":
    # the part resnet12_workloads starts in a process of its own:
    #   python -m benchmarks.resnet12 one WORKLOAD IMPLEMENTATION REPEATS ROOT    one workload, as JSON
    import sys

    if sys.argv[1:2] == ["one"] and len(sys.argv) == 6:
        print(json.dumps(resnet12_one(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])))
    else:
        sys.exit("usage: python -m benchmarks.resnet12 one WORKLOAD IMPLEMENTATION REPEATS ROOT")
