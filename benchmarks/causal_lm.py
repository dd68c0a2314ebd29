"""A causal language model (``causal-lm``): second-order MAML and FOMAML with LoRA on ``task=text_tasks``, over a
random model of Qwen2.5's shapes (0.5B: hidden 896, 24 layers, 14 query and 2 key-value heads, a 151,936-token
vocabulary tied to the output), 128-token texts, meta-batch 2 taken task by task, 2 support and 2 query texts per
task, one inner step. Each against a ``torch.func`` peer on the same batches from the same start: transformers'
``Qwen2ForCausalLM`` (eager attention, which PyTorch can differentiate twice) with peft's LoRA loaded from ours,
``torch.func.functional_call`` over the LoRA weights, Adam. Each side runs in a process of its own; its peak
resident memory is the process's. ``python -m benchmarks causal-lm`` is the command line."""
from __future__ import annotations

import importlib.util
import json
import os
import resource
import string
import subprocess
from pathlib import Path

import numpy as np

from benchmarks.common import in_own_process, our_compiled_step, setup, timed_steps
from metapeft import io
from metapeft.backend import mx

SHAPES = {  # Qwen2.5's published configurations (0.5B, 1.5B, 3B), and a tiny one for the tests
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, tie_word_embeddings=True),
    "tiny": dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
}
VOCAB = {"0.5b": 151936, "1.5b": 151936, "3b": 151936, "tiny": 96}
ALGORITHMS = {"maml": ["algorithm=maml"], "fomaml": ["algorithm=fomaml"]}
LENGTH = 128  # tokens per text, the answer and its end token included


def write_inputs(directory: Path, shape: str, length: int = LENGTH) -> tuple[Path, Path]:
    """A model folder (config.json, a character-level tokenizer; the weights are ours, written by ``save_weights``)
    and a JSON Lines file of four generation tasks whose texts take ``length`` tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    model = directory / f"qwen2-{shape}"
    model.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": VOCAB[shape],
              "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
              "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02, **SHAPES[shape]}
    (model / "config.json").write_text(json.dumps(config, indent=2))
    letters = string.ascii_lowercase + string.digits
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>", *letters, *(f"##{c}" for c in letters)])}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(model / "tokenizer.json"))
    (model / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    rng = np.random.default_rng(0)
    words = lambda n: " ".join("".join(rng.choice(list("abcdefgh"), 6)) for _ in range(n // 6))
    rows = [{"task": f"task{t}", "input": words(length - 8) + "ab"[: (length - 8) % 6], "output": words(6)}
            for t in range(4) for _ in range(8)]
    tasks = directory / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return model, tasks


def overrides(model: Path, tasks: Path, algorithm: str) -> list[str]:
    return ["model=causal_lm", f"model.path={model}", f"model.max_length={LENGTH}", "task=text_tasks",
            f"task.path={tasks}", "task.num_query=2", "task.val_fraction=0.25", "task.test_fraction=0.25",
            "peft=lora", "peft.rank=8", "peft.target_modules=[q_proj,v_proj]", "algorithm.meta_batch_size=2",
            "algorithm.num_inner_steps=1", "algorithm.tasks_per_pass=1", "shots.train=2", *ALGORITHMS[algorithm]]


def lm_one(directory: Path, shape: str, algorithm: str, implementation: str, repeats: int) -> dict:
    """One algorithm by ``mlx`` (the runner's own compiled step) or its ``pytorch`` peer, on the same batches from
    the same start: ms per meta-iteration after one warm-up, the first meta-loss, peak memory."""
    model, tasks = write_inputs(directory, shape)
    exp, meta, frozen = setup(overrides(model, tasks, algorithm))
    rng = np.random.default_rng(0)
    batches = [exp.task.sample("train", 2, 2, rng) for _ in range(repeats + 1)]
    from metapeft import blas

    result: dict = {"implementation": implementation, "blas": blas.status(),
                    "sequence_length": int(batches[0].xs.shape[-1]),
                    "parameters": int(sum(a.size for _, a in mlx_leaves(frozen)))}
    if implementation == "mlx":
        run_step = our_compiled_step(exp, meta, frozen, batches)
    else:
        weights = directory / f"weights-{shape}"
        save_weights(exp, frozen, meta, weights, model)
        del meta, frozen
        run_step, _ = torch_peer(exp, weights, [tuple(np.array(a) for a in b) for b in batches], algorithm)
    result.update(timed_steps(run_step, repeats))
    if implementation == "mlx":
        result["mlx_peak_mb"] = mx.get_peak_memory() / 2**20
    return result


def mlx_leaves(tree: dict):
    from metapeft.trees import leaves_with_paths

    return leaves_with_paths(tree)


def save_weights(exp, frozen: dict, meta: dict, weights: Path, model: Path) -> None:
    """Our random start as the peer reads it: the model folder with our weights, and our LoRA in peft's names."""
    weights.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json"):
        (weights / name).write_text((model / name).read_text())
    io.save_tree(weights / "model.safetensors", exp.model.hf_state_dict(frozen), metadata={"format": "pt"})
    from metapeft.export import PREFIX

    io.save_tree(weights / "lora.safetensors", exp.peft.hf_adapter_tensors(meta["weights"], frozen, PREFIX))


def torch_peer(exp, weights: Path, batches: list, algorithm: str):
    """``step(i)``: the peer's meta-step on batch ``i``, returning the meta-loss before the update; and
    ``meta_gradient(i)``: that loss and its gradient (what the tests compare with ours)."""
    import peft
    import torch
    import transformers
    from safetensors.torch import load_file
    from torch.func import functional_call, grad

    base = transformers.Qwen2ForCausalLM.from_pretrained(str(weights), attn_implementation="eager").eval()
    cfg = exp.cfg
    lora = peft.LoraConfig(r=cfg.peft.rank, lora_alpha=cfg.peft.alpha, lora_dropout=0.0,
                           target_modules=list(cfg.peft.target_modules))
    model = peft.get_peft_model(base, lora).eval()
    peft.set_peft_model_state_dict(model, load_file(str(weights / "lora.safetensors")))
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if "lora_" in n}
    for p in model.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(params.values(), lr=cfg.algorithm.outer_lr)
    inner_lr, second_order = cfg.algorithm.inner_lr, algorithm == "maml"

    def loss(p, x, y):
        logits = functional_call(model, p, (torch.clamp(x, min=0),)).logits
        tokens, answer = y[..., :-1], y[..., -1:]
        counted = ((tokens >= 0) & (answer == 1)).float()
        nll = torch.logsumexp(logits, -1) - logits.gather(-1, tokens.clamp(min=0)[..., None])[..., 0]
        return (nll * counted).sum() / counted.sum().clamp(min=1.0)

    def task_loss(p, xs, ys, xq, yq):
        g = grad(loss)(p, xs, ys)
        inner = {k: v - inner_lr * (g[k] if second_order else g[k].detach()) for k, v in p.items()}
        return loss(inner, xq, yq)

    tensors = [tuple(torch.from_numpy(a.reshape(a.shape[0], -1, a.shape[-1]).astype(np.int64)) for a in b)
               for b in batches]  # (tasks, examples x candidates, L)

    def meta_gradient(i: int) -> tuple[float, dict]:
        """The meta-loss on batch ``i`` and its gradient, by peft's weight names."""
        xs, ys, xq, yq = tensors[i]
        total, grads = 0.0, {k: torch.zeros_like(v) for k, v in params.items()}
        for t in range(len(xs)):  # task by task, as ours
            g, value = torch.func.grad_and_value(task_loss)(params, xs[t], ys[t], xq[t], yq[t])
            total += value.item() / len(xs)
            for k in grads:
                grads[k] += g[k] / len(xs)
        return total, grads

    def step(i: int) -> float:
        total, grads = meta_gradient(i)
        for k, p in params.items():
            p.grad = grads[k]
        optimizer.step()
        return total

    return step, meta_gradient


def lm_workloads(directory: Path, shape: str, algorithms: list[str], repeats: int, with_peer: bool = True) -> dict:
    """Each algorithm and, where PyTorch, transformers and peft are installed, its peer, each in a process of its
    own; the peer timed only if its first meta-loss equals ours."""
    limit = memory_limit()

    def one(algorithm: str, implementation: str) -> dict:
        # each side's address space is capped below the machine's memory: a side that needs more fails cleanly
        # with an allocation error instead of driving the machine into paging
        done = subprocess.run(in_own_process("causal_lm", "one", str(directory), shape, algorithm, implementation,
                                             str(repeats)), capture_output=True, text=True,
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
        if done.returncode != 0:
            out_of_memory = done.returncode < 0 or any(s in done.stderr for s in OUT_OF_MEMORY)
            return {"failed": f"exit {done.returncode}" + (f" (out of memory: its address space is capped at "
                                                            f"{limit / 2**30:.1f} GiB)" if out_of_memory else ""),
                    "memory_limit_gib": limit / 2**30, "stderr_tail": done.stderr[-800:]}
        return {**json.loads(done.stdout.splitlines()[-1]), "memory_limit_gib": limit / 2**30}

    has_peer = with_peer and all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft"))
    results = {}
    for algorithm in algorithms:
        results[algorithm] = ours = one(algorithm, "mlx")
        if not has_peer:
            continue
        theirs = one(algorithm, "pytorch")
        if "failed" in ours or "failed" in theirs:
            ours["pytorch"] = theirs
        elif not np.isclose(theirs["first_loss"], ours["first_loss"], rtol=1e-4):
            ours["pytorch"] = f"refused: its meta-loss {theirs['first_loss']} differs from ours {ours['first_loss']}"
        else:
            ours["pytorch"] = {**theirs, "ours_over_peer": ours["ms_per_iteration"] / theirs["ms_per_iteration"]}
    return results


OUT_OF_MEMORY = ("can't allocate memory", "MemoryError", "std::bad_alloc", "Unable to allocate")


def memory_limit() -> int:
    """Bytes of address space each side may map: 90 % of the machine's physical memory."""
    return int(0.9 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def print_lm(shape: str, results: dict) -> None:
    for name, r in results.items():
        if "failed" in r:
            print(f"causal-lm {shape} {name:8s} failed: {r['failed']}")
            continue
        peer = r.get("pytorch")
        versus = (f"; torch.func {peer['ms_per_iteration']:.0f} ms, {peer['max_rss_mb']:.0f} MB RSS: "
                  f"{peer['ours_over_peer']:.2f}x" if isinstance(peer, dict) and "ms_per_iteration" in peer
                  else f"; torch.func failed: {peer['failed']}" if isinstance(peer, dict)
                  else f"; torch.func: {peer}" if peer else "")
        print(f"causal-lm {shape} ({r['parameters'] / 1e6:.0f}M parameters) {name:8s} {r['ms_per_iteration']:8.0f} "
              f"ms per meta-iteration, MLX peak {r['mlx_peak_mb']:6.0f} MB, {r['max_rss_mb']:6.0f} MB RSS{versus}")


if __name__ == "__main__":
    # the part lm_workloads starts in a process of its own:
    #   python -m benchmarks.causal_lm one DIRECTORY SHAPE ALGORITHM IMPLEMENTATION REPEATS    as JSON
    import sys

    if sys.argv[1:2] == ["one"] and len(sys.argv) == 7:
        print(json.dumps(lm_one(Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))))
    else:
        sys.exit("usage: python -m benchmarks.causal_lm one DIRECTORY SHAPE ALGORITHM IMPLEMENTATION REPEATS")
