"""The pretrained encoder: MAML task by task (plain and checkpointed), FOMAML and Reptile with LoRA on
``model=hf_encoder``, each against its PyTorch ``torch.func`` peer in a process of its own (``encoder``), and the
encoder's largest operations in MLX and PyTorch (``encoder-ops``). ``python -m benchmarks`` is the command line."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import time

import numpy as np

from benchmarks.common import compose_workload, in_own_process, our_compiled_step, peer_spec, setup, timed_steps
from metapeft.backend import mx, utils

# second-order MAML + LoRA over the pretrained encoder: meta-batch 4, 5 inner steps, 5-way 5-shot,
# 64 tokens per text; FOMAML and Reptile beside it.
ENCODER = ["model=hf_encoder", "task=text", "peft=lora", "algorithm.meta_batch_size=4", "algorithm.num_inner_steps=5",
           "shots.train=5", "model.max_length=64"]
VMAPPED = "algorithm.tasks_per_pass=null"  # the 4 tasks vmapped in one pass (the encoder's default is one task a pass)
MLX_KERNELS = "model.kernels=mlx"  # layer norm, softmax and GELU in MLX's operations, not metapeft's CPU kernels
ENCODER_VARIANTS = {
    # all 4 tasks vmapped at once: killed by the out-of-memory killer at 24 GB; run only when named
    "maml": ["algorithm=maml", VMAPPED],
    "maml_task_by_task": ["algorithm=maml", "algorithm.tasks_per_pass=1"],
    "maml_task_by_task_checkpointed": ["algorithm=maml", "algorithm.tasks_per_pass=1",
                                       "algorithm.checkpoint_inner_steps=true"],
    "fomaml": ["algorithm=fomaml", VMAPPED],
    # attention with mx.softmax, as before the polynomial one (with MLX's layer norm and GELU, as then)
    "fomaml_mlx_softmax": ["algorithm=fomaml", VMAPPED, "model.softmax=mlx", MLX_KERNELS],
    "reptile": ["algorithm=reptile", VMAPPED],
    # two passes at once, each on a CPU stream of its own (two cores for the element-wise work)
    "fomaml_two_streams": ["algorithm=fomaml", VMAPPED, "algorithm.parallel_passes=2"],
    "maml_task_by_task_checkpointed_two_streams": ["algorithm=maml", "algorithm.tasks_per_pass=1",
                                                   "algorithm.checkpoint_inner_steps=true",
                                                   "algorithm.parallel_passes=2"],
    "reptile_two_streams": ["algorithm=reptile", VMAPPED, "algorithm.parallel_passes=2"],
    # one task a pass: no vmap, so no scalar constant becomes a broadcast input of a fused kernel
    "fomaml_task_by_task": ["algorithm=fomaml", "algorithm.tasks_per_pass=1"],
    "fomaml_task_by_task_two_streams": ["algorithm=fomaml", "algorithm.tasks_per_pass=1",
                                        "algorithm.parallel_passes=2"],
    # the main variants with MLX's operations for layer norm, softmax and GELU (as before the kernels)
    "fomaml_mlx_kernels": ["algorithm=fomaml", VMAPPED, MLX_KERNELS],
    "fomaml_task_by_task_mlx_kernels": ["algorithm=fomaml", "algorithm.tasks_per_pass=1", MLX_KERNELS],
    "maml_task_by_task_checkpointed_mlx_kernels": ["algorithm=maml", "algorithm.tasks_per_pass=1",
                                                   "algorithm.checkpoint_inner_steps=true", MLX_KERNELS],
}
ENCODER_DEFAULT = "maml_task_by_task,maml_task_by_task_checkpointed,fomaml,reptile"


def encoder_one(variant: str, implementation: str, repeats: int) -> dict:
    """One of ENCODER_VARIANTS by ``mlx`` (the runner's own compiled step) or its ``pytorch`` peer (torch.func,
    eager; task by task where ours is), on the same batches from the same start: ms per iteration after one
    warm-up iteration, the loss of the first, and the process's peak resident memory (run alone in a process)."""
    exp, meta, frozen = setup([*ENCODER, *ENCODER_VARIANTS[variant]])
    rng = np.random.default_rng(0)
    batches = [exp.task.sample("train", 4, 5, rng) for _ in range(repeats + 1)]
    result: dict = {"implementation": implementation, "sequence_length": int(batches[0].xs.shape[-1])}
    if implementation == "mlx":
        run_step = our_compiled_step(exp, meta, frozen, batches)
    else:
        from benchmarks.peers import torch_peer

        to_numpy = lambda tree: utils.tree_map(lambda a: np.array(a), tree)
        _, peer_step, sync = torch_peer(peer_spec(exp), to_numpy(meta["weights"]), to_numpy(frozen),
                                            [tuple(np.array(a) for a in b) for b in batches])
        del meta, frozen  # the peer holds its own copies
        run_step = lambda i: sync(peer_step(i))  # the meta-loss before the update, as ours
    result.update(timed_steps(run_step, repeats))
    if implementation == "mlx":
        result["mlx_peak_mb"] = mx.get_peak_memory() / 2**20
    return result


# ENCODER_VARIANTS with a PyTorch peer: the same computation, task by task where ours is (checkpointed or not)
PEER_OF = {"maml_task_by_task": "maml_task_by_task", "maml_task_by_task_checkpointed": "maml_task_by_task",
           "fomaml": "fomaml", "fomaml_mlx_softmax": "fomaml", "reptile": "reptile",
           "fomaml_two_streams": "fomaml", "maml_task_by_task_checkpointed_two_streams": "maml_task_by_task",
           "reptile_two_streams": "reptile",
           "fomaml_task_by_task": "fomaml", "fomaml_task_by_task_two_streams": "fomaml",
           "fomaml_mlx_kernels": "fomaml", "fomaml_task_by_task_mlx_kernels": "fomaml",
           "maml_task_by_task_checkpointed_mlx_kernels": "maml_task_by_task"}


def encoder_ops(implementation: str, repeats: int = 20) -> dict:
    """Milliseconds per call of the encoder's largest operations at the encoder benchmark's shapes (25 texts of 39
    tokens, MiniLM's widths), in MLX (compiled, as in the meta-step) or PyTorch (eager, its own threads); the
    softmax twice in MLX, ``mx.softmax`` and the encoder's polynomial one (``model.softmax``), and the polynomial
    one with its gradient; GELU with its gradient, given (the model's) and traced through the forward; and GELU over
    a meta-batch of 4 tasks, vmapped (as a meta-step with several tasks a pass computes it) and as one array
    (PyTorch: one array both times), the last also with MLX's CPU buffer cache at 1 GiB instead of its 32 MiB
    default (timed last, since the limit stays set); layer norm as called and compiled (as the meta-step runs it),
    and one of its reductions alone; and layer norm, softmax and GELU on metapeft's CPU kernels (``model.kernels``:
    the model's default on the CPU), alone and with their gradients, the PyTorch side the same operations again."""
    rng = np.random.default_rng(0)
    shapes = {"x": (975, 384), "w": (384, 1536), "h": (975, 1536), "scores": (25, 12, 39, 39),
              "tasks": (4, 975, 1536)}
    data = {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}
    if implementation == "mlx":
        from metapeft.models.gelu import gelu
        from metapeft.models.softmax import softmax as polynomial_softmax

        x, w, h, scores, tasks = (mx.array(data[n]) for n in ("x", "w", "h", "scores", "tasks"))
        scale, bias, cotangent = mx.ones((384,)), mx.zeros((384,)), mx.ones_like(h)
        compiled_gelu, softmax = mx.compile(gelu), mx.compile(lambda s: mx.softmax(s, axis=-1))
        ours_softmax, vmapped_gelu = mx.compile(polynomial_softmax), mx.compile(mx.vmap(gelu))
        softmax_and_gradient = mx.compile(lambda s, c: mx.vjp(polynomial_softmax, [s], [c]))
        score_cotangent = mx.array(rng.normal(size=shapes["scores"]).astype(np.float32))
        gelu_and_gradient = mx.compile(lambda h, c: mx.vjp(gelu, [h], [c]))
        traced = mx.compile(lambda h, c: mx.vjp(gelu.forward, [h], [c]))  # the same forward, traced
        ops = {"matmul (975x384 @ 384x1536)": lambda: x @ w, "GELU (975x1536)": lambda: compiled_gelu(h),
               "GELU and its gradient": lambda: gelu_and_gradient(h, cotangent),
               "GELU and its gradient, traced": lambda: traced(h, cotangent),
               "GELU, 4 tasks vmapped": lambda: vmapped_gelu(tasks),
               "GELU, 4 tasks as one array": lambda: compiled_gelu(tasks),
               "softmax (25x12x39x39)": lambda: softmax(scores),
               "softmax, polynomial exp": lambda: ours_softmax(scores),
               "softmax, polynomial exp, and its gradient": lambda: softmax_and_gradient(scores, score_cotangent),
               "layer norm (975x384)": lambda: mx.fast.layer_norm(x, scale, bias, 1e-12),
               "layer norm, compiled": lambda: compiled_layer_norm(x),
               "mean over the last axis (975x384)": lambda: x.mean(axis=-1),
               "add (975x1536)": lambda: h + h,
               "GELU, 4 tasks as one array, 1 GiB buffer cache": lambda: cached(compiled_gelu, tasks)}
        compiled_layer_norm = mx.compile(lambda v: mx.fast.layer_norm(v, scale, bias, 1e-12))
        ops.update(native_ops_timed(x, h, scores, scale, bias, cotangent, score_cotangent))
        last = "GELU, 4 tasks as one array, 1 GiB buffer cache"  # timed last: the cache limit stays set
        ops[last] = ops.pop(last)

        def cached(op, *args):  # freed buffers up to 1 GiB are kept for reuse (MLX's CPU default: 32 MiB)
            mx.set_cache_limit(1 << 30)
            return op(*args)

        sync = mx.eval
    else:
        import torch

        x, w, h, scores, tasks = (torch.from_numpy(data[n]) for n in ("x", "w", "h", "scores", "tasks"))
        scale, bias, cotangent = torch.ones(384), torch.zeros(384), torch.ones_like(h)
        gelu = torch.nn.functional.gelu

        def gelu_and_gradient():
            leaf = h.detach().requires_grad_()
            out = gelu(leaf)
            return out, torch.autograd.grad(out, leaf, cotangent)

        score_cotangent = torch.from_numpy(rng.normal(size=shapes["scores"]).astype(np.float32))

        def softmax_and_gradient():
            leaf = scores.detach().requires_grad_()
            out = torch.softmax(leaf, -1)
            return out, torch.autograd.grad(out, leaf, score_cotangent)

        ops = {"matmul (975x384 @ 384x1536)": lambda: x @ w, "GELU (975x1536)": lambda: gelu(h),
               "GELU and its gradient": gelu_and_gradient, "GELU and its gradient, traced": gelu_and_gradient,
               "GELU, 4 tasks vmapped": lambda: gelu(tasks), "GELU, 4 tasks as one array": lambda: gelu(tasks),
               "softmax (25x12x39x39)": lambda: torch.softmax(scores, -1),
               "softmax, polynomial exp": lambda: torch.softmax(scores, -1),  # PyTorch's own, beside ours
               "softmax, polynomial exp, and its gradient": softmax_and_gradient,
               "layer norm (975x384)": lambda: torch.nn.functional.layer_norm(x, (384,), scale, bias, 1e-12),
               "layer norm, compiled": lambda: torch.nn.functional.layer_norm(x, (384,), scale, bias, 1e-12),
               "mean over the last axis (975x384)": lambda: x.mean(-1),
               "add (975x1536)": lambda: h + h,
               "GELU, 4 tasks as one array, 1 GiB buffer cache": lambda: gelu(tasks)}
        x_cotangent = torch.ones_like(x)

        def layer_norm_and_gradient():
            leaves = [t.detach().requires_grad_() for t in (x, scale, bias)]
            out = torch.nn.functional.layer_norm(leaves[0], (384,), leaves[1], leaves[2], 1e-12)
            return out, torch.autograd.grad(out, leaves, x_cotangent)

        last = "GELU, 4 tasks as one array, 1 GiB buffer cache"
        ops = {**ops, "native: GELU": ops["GELU (975x1536)"], "native: GELU and its gradient": gelu_and_gradient,
               "native: softmax": ops["softmax (25x12x39x39)"],
               "native: softmax and its gradient": softmax_and_gradient,
               "native: layer norm": ops["layer norm (975x384)"],
               "native: layer norm and its gradient": layer_norm_and_gradient, last: ops.pop(last)}
        sync = lambda out: None
    results = {}
    for name, op in ops.items():
        sync(op())
        start = time.perf_counter()
        for _ in range(repeats):
            sync(op())
        results[name] = 1e3 * (time.perf_counter() - start) / repeats
    return results


def native_ops_timed(x, h, scores, scale, bias, cotangent, score_cotangent) -> dict:
    """encoder_ops's entries for metapeft's CPU kernels (metapeft/models/native_ops.py), compiled as in the step."""
    from metapeft.models import native_ops

    gelu, softmax = mx.compile(native_ops.gelu), mx.compile(native_ops.softmax)
    layer_norm = mx.compile(lambda v: native_ops.layer_norm(v, scale, bias, 1e-12))
    gelu_and_gradient = mx.compile(lambda a, c: mx.vjp(native_ops.gelu, [a], [c]))
    softmax_and_gradient = mx.compile(lambda s, c: mx.vjp(native_ops.softmax, [s], [c]))
    layer_norm_and_gradient = mx.compile(
        lambda v, s, b, c: mx.vjp(lambda *a: native_ops.layer_norm(*a, 1e-12), [v, s, b], [c]))
    x_cotangent = mx.ones_like(x)
    return {"native: GELU": lambda: gelu(h), "native: GELU and its gradient": lambda: gelu_and_gradient(h, cotangent),
            "native: softmax": lambda: softmax(scores),
            "native: softmax and its gradient": lambda: softmax_and_gradient(scores, score_cotangent),
            "native: layer norm": lambda: layer_norm(x),
            "native: layer norm and its gradient": lambda: layer_norm_and_gradient(x, scale, bias, x_cotangent)}


def text_padding(overrides: list[str], num_tasks: int = 200) -> dict:
    """How much of the encoder's input is padding: over ``num_tasks`` episodes of each split and K (the run's own
    sampling, ``task=text`` by default), the real tokens of a text and the longest text of an episode, as shares of
    the padded width every text gets (the corpus's longest, at most ``model.max_length``). What padding each
    episode to its own longest text (the second) or bucketing texts by length (at best the first) could save."""
    from metapeft.build import build

    exp = build(compose_workload(["model=hf_encoder", "task=text", *overrides]))
    rng, pad, results = np.random.default_rng(0), exp.task.pad_id, {}
    for split, shots in (("train", exp.cfg.shots.train), *(("test", k) for k in exp.cfg.shots.eval)):
        episodes = exp.task.sample(split, num_tasks, shots, rng)
        for part, tokens in (("support", np.asarray(episodes.xs)), ("query", np.asarray(episodes.xq))):
            real, width = (tokens != pad).sum(axis=-1), tokens.shape[-1]  # (tasks, examples)
            results[f"{split} K={shots} {part}"] = {
                "width": width, "real_tokens": float(real.mean()), "real_share": float(real.mean() / width),
                "longest_share": float((real.max(axis=-1) / width).mean()),
                "episodes_filling_the_width": float((real.max(axis=-1) == width).mean())}
    return results


def print_text_padding(results: dict) -> None:
    for name, r in results.items():
        filling = r["episodes_filling_the_width"]
        print(f"{name:22s} width {r['width']}: a text {r['real_tokens']:.2f} real tokens ({r['real_share']:.1%}); "
              f"an episode's longest {r['longest_share']:.1%}, the whole width in {filling:.1%}")


def encoder_streams(repeats: int) -> dict:
    """Seconds for the encoder benchmark's 4 FOMAML tasks taken as two halves: on one CPU stream, on two evaluated
    by one thread, or on two each evaluated by a thread of its own (as ``algorithm.parallel_passes=2`` does): the
    query loss's forward pass, its gradient, and the whole meta-gradient (5 inner steps, then the query gradient).
    Each the median of ``repeats`` after one warm-up."""
    from metapeft.streams import ParallelStreams
    from metapeft.train import as_episodes

    exp, meta, frozen = setup([*ENCODER, *ENCODER_VARIANTS["fomaml"]])
    b = exp.task.sample("train", 4, 5, np.random.default_rng(0))
    batch = [mx.array(np.array(a)) for a in (b.xs, b.ys, b.xq, b.yq)]
    weights, learner = meta["weights"], exp.learner
    mx.eval(meta, frozen, batch)
    losses = lambda w, x, y: mx.vmap(lambda a, c: exp.loss(w, frozen, a, c))(x, y).sum()
    parts = {
        "forward": lambda h: losses(weights, h[2], h[3]),
        "gradient": lambda h: mx.grad(losses)(weights, h[2], h[3]),
        "meta-gradient": lambda h: learner.meta_value_and_grad(meta, frozen, as_episodes(*h)),
    }
    halves = [[a[:2] for a in batch], [a[2:] for a in batch]]
    mx.eval(halves)
    threaded = ParallelStreams(2)  # the second stream owned and evaluated by a thread of its own
    streams = [mx.default_stream(mx.cpu), mx.new_stream(mx.cpu)]

    def on(stream_of_half: list, part, evaluate=mx.eval):
        outs = []
        for half, stream in zip(halves, stream_of_half):
            with mx.stream(stream):
                outs.append(part(half))
        evaluate(outs)

    results = {}
    for name, part in parts.items():
        for label, chosen, evaluate in (("one stream", [streams[0]] * 2, mx.eval),
                                        ("two streams, one thread", streams, mx.eval),
                                        ("two streams, a thread each", threaded.streams, threaded.evaluate)):
            times = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                on(chosen, part, evaluate)
                times.append(time.perf_counter() - start)
            results[f"{name}, {label}"] = float(np.median(times[1:]))
    return results


def encoder_workloads(repeats: int, variants: list[str]) -> dict:
    """Each variant and, where PyTorch is installed, its peer, each in a process of its own (peak memory is the
    process's), the peer timed only if its first meta-loss equals ours."""
    def one(variant: str, implementation: str) -> dict:
        done = subprocess.run(in_own_process("encoder", "one", variant, implementation, str(repeats)),
                              capture_output=True, text=True)
        if done.returncode != 0:
            return {"failed": f"exit {done.returncode}" + (" (killed: out of memory?)" if done.returncode < 0 else ""),
                    "stderr_tail": done.stderr[-500:]}
        return json.loads(done.stdout.splitlines()[-1])

    results, peers = {}, {}
    for variant in variants:
        results[variant] = ours = one(variant, "mlx")
        peer = PEER_OF.get(variant)
        if peer is None or importlib.util.find_spec("torch") is None:
            continue
        if peer not in peers:
            peers[peer] = one(peer, "pytorch")
        theirs = peers[peer]
        if "failed" in ours or "failed" in theirs:
            ours["pytorch"] = theirs
        elif not np.isclose(theirs["first_loss"], ours["first_loss"], rtol=1e-4):
            ours["pytorch"] = f"refused: its meta-loss {theirs['first_loss']} differs from ours {ours['first_loss']}"
        else:
            ours["pytorch"] = {**theirs, "ours_over_peer": ours["ms_per_iteration"] / theirs["ms_per_iteration"]}
    return results


def encoder_ops_both() -> dict:
    """encoder_ops in MLX and in PyTorch, each in a process of its own (PyTorch's threads slow MLX's in one)."""
    return {impl: json.loads(subprocess.run(in_own_process("encoder", "ops", impl), check=True,
                                            capture_output=True, text=True).stdout.splitlines()[-1])
            for impl in ("mlx", "pytorch")}


def print_encoder_ops(both: dict) -> None:
    for name, ours in both["mlx"].items():
        theirs = both["pytorch"][name]
        print(f"{name:30s} MLX {ours:7.2f} ms, PyTorch {theirs:7.2f} ms: {ours / theirs:5.2f}x")


def print_encoder(results: dict) -> None:
    for name, r in results.items():
        if "failed" in r:
            print(f"encoder {name:32s} failed: {r['failed']}")
            continue
        peer = r.get("pytorch")
        versus = (f"; PyTorch {peer['ms_per_iteration']:.0f} ms, {peer['max_rss_mb']:.0f} MB RSS: "
                  f"{peer['ours_over_peer']:.2f}x" if isinstance(peer, dict) and "ms_per_iteration" in peer
                  else f"; PyTorch: {peer}" if peer else "")
        print(f"encoder {name:32s} {r['ms_per_iteration']:8.0f} ms per iteration, MLX peak "
              f"{r['mlx_peak_mb']:6.0f} MB, {r['max_rss_mb']:6.0f} MB RSS{versus}")


if __name__ == "__main__":
    # the parts encoder_workloads and encoder_ops_both start in processes of their own:
    #   python -m benchmarks.encoder one VARIANT IMPLEMENTATION REPEATS    one variant (mlx or pytorch), as JSON
    #   python -m benchmarks.encoder ops IMPLEMENTATION                     the largest operations, as JSON
    import sys

    if sys.argv[1:2] == ["one"] and len(sys.argv) == 5:
        print(json.dumps(encoder_one(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    elif sys.argv[1:2] == ["ops"] and len(sys.argv) == 3:
        print(json.dumps(encoder_ops(sys.argv[2])))
    else:
        sys.exit("usage: python -m benchmarks.encoder one VARIANT IMPLEMENTATION REPEATS | ops IMPLEMENTATION")
