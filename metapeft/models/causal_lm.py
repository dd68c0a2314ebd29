"""A Hugging Face decoder-only language model (Llama, Qwen2, Mistral; GPT-2 in ``gpt2.py``) in MLX, read from a
local folder, in one of two roles the task decides:

- a language model (``task=text_tasks``, text-to-text): the output is the next-token logits from the checkpoint's
  own ``lm_head`` (or the token embeddings, where ``tie_word_embeddings``), frozen with the backbone, as
  ``LlamaForCausalLM`` computes them. There is no task head.
- a few-shot text classifier (``task=text``, ``task=text_folder``): a task head on the hidden state of each text's
  last token, as ``LlamaForSequenceClassification`` reads it; ``lm_head`` is not read.

The folder holds ``config.json``, ``tokenizer.json`` and the weights as ``model.safetensors`` or shards listed in
``model.safetensors.index.json`` (float32, float16 or bfloat16; computed in float32). Parameters keep Hugging Face's
names (``model.layers.0.self_attn.q_proj``, ...), so ``peft.target_modules=[q_proj,v_proj]`` names what Hugging
Face peft's LoRA targets on these models. Linear weights are stored as (in, out); the token embeddings and
``lm_head`` as arrays in Hugging Face's (vocabulary, width) layout: not layers PEFT methods adapt, as peft's
``all-linear`` leaves ``lm_head`` out.

The forward pass is ``LlamaModel``'s in inference mode: RMSNorm before attention and before the SwiGLU MLP,
rotary position embeddings (Hugging Face's half-rotation layout; Llama 3's ``rope_scaling`` and transformers 5's
``rope_parameters`` read), grouped-query attention with a causal mask, the final RMSNorm. Qwen2 adds biases to the
query, key and value projections; Llama's ``attention_bias`` / ``mlp_bias`` are read too. Texts are right-padded with
-1 (no token id), so the causal mask alone keeps padding out of every real token's state; the pooled state is the
last real token's (``model.pooling=last``) or the mean over the real tokens (``mean``).

Prompt tuning prepends its vectors to the embedded tokens, which then take positions 0..n-1; prefix tuning prepends
keys and values in every attention layer (keys as attention sees them, after the rotation) and shifts the tokens'
positions by n: what Hugging Face peft's prompt tuning (``inputs_embeds``) and prefix tuning (``past_key_values``)
give ``AutoModelForCausalLM``. The outputs at the virtual tokens are left out.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
from omegaconf import MISSING

from metapeft.backend import mx
from metapeft.errors import ConfigError, require
from metapeft.models.gpt2 import GPT2Layout
from metapeft.models.layers import Backbone, init_linear
from metapeft.models.softmax import SoftmaxKind, attention_softmax
from metapeft.registry import MODELS
from metapeft.trees import leaves_with_paths, map_with_path

SUPPORTED_TYPES = ("llama", "qwen2", "mistral", "gpt2")
PAD = -1  # right padding: no token id, so no real token is ever taken for padding


class LastOrMean(StrEnum):
    last = "last"
    mean = "mean"


@dataclass
class CausalLMConfig:
    name: str = "causal_lm"
    path: str = MISSING  # a Hugging Face model folder (config.json, tokenizer.json, safetensors)
    pooling: LastOrMean = LastOrMean.last
    max_length: int = 32  # tokens per text, special tokens included; longer texts are truncated
    default_outer_lr: float = 0.0003  # as model=hf_encoder's: a pretrained transformer under Adam
    softmax: SoftmaxKind = SoftmaxKind.polynomial  # attention's (metapeft/models/softmax.py), as model=hf_encoder's


def read_config(directory: Path) -> dict:
    """``config.json``, once the folder is checked to hold it and ``tokenizer.json``."""
    for name in ("config.json", "tokenizer.json"):
        require((directory / name).is_file(), "model.path", f"{directory} lacks {name}; a Hugging Face model folder "
                "holds config.json, tokenizer.json and model.safetensors (or its shards)")
    return json.loads((directory / "config.json").read_text())


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files holding the weights: one, or the shards its index lists."""
    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [name for name in shards if not (directory / name).is_file()]
        require(not missing, "model.path", f"{directory} lacks the shards {missing} that {index.name} lists")
        return [directory / name for name in shards]
    raise ConfigError("model.path", f"{directory} has neither model.safetensors nor model.safetensors.index.json")


@MODELS.register("causal_lm", CausalLMConfig)
class CausalLM(Backbone):
    reads_tokens = True  # inputs are token ids from ``tokenize``: text tasks only
    input_layer = ("model", "embed_tokens")
    supports_prompts = True
    supports_prefixes = True
    hf_task_type = "CAUSAL_LM"  # what peft loads an exported prefix onto: AutoModelForCausalLM

    def __new__(cls, cfg: CausalLMConfig, *args):
        """GPT-2 folders build ``GPT2`` (below: another layer layout, the same interface)."""
        if cls is CausalLM and read_config(Path(cfg.path).expanduser()).get("model_type") == "gpt2":
            return super().__new__(GPT2)
        return super().__new__(cls)

    def __init__(self, cfg: CausalLMConfig, input_shape: tuple[int, ...] | None, output_dim: int):
        require(cfg.max_length >= 2, "model.max_length", f"must be >= 2, got {cfg.max_length}")
        self.cfg = cfg
        self.directory = Path(cfg.path).expanduser()
        self.config = c = read_config(self.directory)
        require(c.get("model_type") in SUPPORTED_TYPES, "model.path", f"{self.directory} holds a "
                f"'{c.get('model_type')}' model; model=causal_lm reads model types {list(SUPPORTED_TYPES)}")
        self.output_dim = output_dim
        self.generates = output_dim is None  # a text-to-text task: next-token logits, no task head
        self.tied = bool(c.get("tie_word_embeddings", c["model_type"] == "gpt2"))  # lm_head is the token embeddings
        self.softmax = attention_softmax(cfg.softmax)
        self._tokenizer = None
        self.read_architecture(c)

    def read_architecture(self, c: dict) -> None:
        require(c.get("hidden_act", "silu") == "silu", "model.path",
                f"only hidden_act 'silu' is implemented, {self.directory} uses '{c.get('hidden_act')}'")
        self.width, self.num_heads = c["hidden_size"], c["num_attention_heads"]
        self.num_kv_heads = c.get("num_key_value_heads") or self.num_heads
        self.head_dim = c.get("head_dim") or self.width // self.num_heads
        self.eps = c.get("rms_norm_eps", 1e-6)
        self.qkv_bias = c["model_type"] == "qwen2" or bool(c.get("attention_bias", False))
        self.output_bias = bool(c.get("attention_bias", False)) and c["model_type"] != "qwen2"
        self.mlp_bias = bool(c.get("mlp_bias", False))
        self.inverse_frequencies = rope_inverse_frequencies(c, self.head_dim)

    # --- text in, token ids out ---------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(self.directory / "tokenizer.json"))
            tokenizer.no_padding()
            tokenizer.enable_truncation(self.cfg.max_length)
            self._tokenizer = tokenizer
        return self._tokenizer

    pad_id = PAD

    @property
    def context_length(self) -> int:
        """The most positions the model was built for (``max_position_embeddings``)."""
        return int(self.config.get("max_position_embeddings") or 1 << 30)

    def encode(self, texts: list[str], special_tokens: bool) -> list[list[int]]:
        """Each text's token ids, untruncated; ``special_tokens``: with those the tokenizer adds (Llama's ``<s>``)."""
        tokenizer = self.tokenizer
        tokenizer.no_truncation()
        try:
            return [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=special_tokens)]
        finally:
            tokenizer.enable_truncation(self.cfg.max_length)

    @property
    def eos_id(self) -> int:
        """The end-of-sequence token that ends every output: ``tokenizer_config.json``'s ``eos_token``, else
        ``config.json``'s ``eos_token_id`` (the first of a list) where the vocabulary holds it."""
        settings = self.directory / "tokenizer_config.json"
        token = json.loads(settings.read_text()).get("eos_token") if settings.is_file() else None
        if isinstance(token, dict):  # older files: {"content": "</s>", ...}
            token = token.get("content")
        found = self.tokenizer.token_to_id(token) if isinstance(token, str) else None
        if found is None:
            found = self.config.get("eos_token_id")
            found = found[0] if isinstance(found, list) and found else found
        vocab = self.config.get("vocab_size", 0)
        require(isinstance(found, int) and 0 <= found < vocab, "model.path",
                f"{self.directory} names no end-of-sequence token in the vocabulary ({vocab} tokens): give "
                "tokenizer_config.json an eos_token, or config.json an eos_token_id, that the tokenizer knows")
        return found

    def tokenize(self, texts: list[str]) -> np.ndarray:
        """Token ids (texts, L), L = the longest text's length (at most ``max_length``), right-padded with -1."""
        encoded = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        ids = np.full((len(encoded), max(map(len, encoded), default=1)), PAD, dtype=np.int32)
        for row, tokens in zip(ids, encoded):
            row[: len(tokens)] = tokens
        return ids

    # --- parameters -----------------------------------------------------------------------------------------------

    def init(self, key: mx.array) -> dict:
        """A randomly initialized model of this architecture (N(0, 0.02) weights), with a task head; the
        checkpoint's weights come from ``pretrained``."""
        c, std, h = self.config, self.config.get("initializer_range", 0.02), self.width
        keys = iter(mx.random.split(key, 3 + 7 * c["num_hidden_layers"]))

        def linear(fan_in, fan_out, bias):
            layer = {"weight": std * mx.random.normal((fan_in, fan_out), key=next(keys))}
            return {**layer, "bias": mx.zeros((fan_out,))} if bias else layer

        kv, f = self.num_kv_heads * self.head_dim, c["intermediate_size"]
        return {
            "model": {
                "embed_tokens": std * mx.random.normal((c["vocab_size"], h), key=next(keys)),
                "layers": [{
                    "input_layernorm": {"weight": mx.ones((h,))},
                    "self_attn": {"q_proj": linear(h, self.num_heads * self.head_dim, self.qkv_bias),
                                  "k_proj": linear(h, kv, self.qkv_bias), "v_proj": linear(h, kv, self.qkv_bias),
                                  "o_proj": linear(self.num_heads * self.head_dim, h, self.output_bias)},
                    "post_attention_layernorm": {"weight": mx.ones((h,))},
                    "mlp": {"gate_proj": linear(h, f, self.mlp_bias), "up_proj": linear(h, f, self.mlp_bias),
                            "down_proj": linear(f, h, self.mlp_bias)},
                } for _ in range(c["num_hidden_layers"])],
                "norm": {"weight": mx.ones((h,))},
            },
            **self.output_layer(next(keys), (c["vocab_size"], h)),
        }

    def output_layer(self, key: mx.array, vocab_by_width: tuple[int, int]) -> dict:
        """A language model's own ``lm_head`` (none where tied to the embeddings); a classifier's task head."""
        if self.generates:
            std = self.config.get("initializer_range", 0.02)
            return {} if self.tied else {"lm_head": std * mx.random.normal(vocab_by_width, key=key)}
        return {"head": init_linear(key, vocab_by_width[1], self.output_dim)}

    def pretrained(self, key: mx.array, num_outputs: int) -> tuple[dict, dict]:
        """The checkpoint's weights in this model's tree (with a fresh head of ``num_outputs``) and their source."""
        flat: dict = {}
        for path in weight_files(self.directory):  # a GPT2LMHeadModel's body is under "transformer."
            flat.update({k.removeprefix("transformer."): v for k, v in mx.load(str(path)).items()})
        expected = self.init(mx.random.key(0))
        tree = fill_from_hf_names(flat, {k: v for k, v in expected.items() if k != "head"}, self.directory,
                                  self.hf_name, self.transposed)
        if not self.generates:
            tree["head"] = init_linear(key, self.width, num_outputs)
        return tree, {"source": str(self.directory)}

    @staticmethod
    def hf_name(path: tuple) -> str:
        """A parameter's name in the checkpoint (the embeddings and ``lm_head``, arrays here, end in ``.weight``)."""
        return ".".join(str(k) for k in path) + (".weight" if path[-1] in ("embed_tokens", "lm_head") else "")

    transposed = True  # PyTorch's nn.Linear stores (out, in)

    def hf_state_dict(self, tree: dict) -> dict:
        """The body of ``tree`` under the checkpoint's names and layouts (what export writes; ``lm_head`` where the
        model is a language model with its own)."""
        body = {k: v for k, v in tree.items() if k != "head"}
        return {self.hf_name(path): value.T if self.transposed and path[-1] == "weight" and value.ndim == 2 else value
                for path, value in leaves_with_paths(body)}

    @staticmethod
    def hf_module_name(name: str) -> str:
        """A module's name in ``AutoModelForCausalLM``, which a peft adapter is loaded onto: this tree's names."""
        return name

    # --- forward --------------------------------------------------------------------------------------------------

    def rms_norm(self, params: dict, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, params["weight"], self.eps)

    def rotary(self, x: mx.array, offset: int = 0) -> mx.array:
        """Rotary position embeddings in Hugging Face's layout (the halves of each head rotated), positions from
        ``offset``."""
        positions = mx.arange(offset, offset + x.shape[-2], dtype=mx.float32)
        angles = positions[:, None] * self.inverse_frequencies[None, :]
        cos, sin = mx.cos(mx.concatenate([angles, angles], -1)), mx.sin(mx.concatenate([angles, angles], -1))
        half = x.shape[-1] // 2
        rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def heads(self, t: mx.array, n: int) -> mx.array:
        """(..., L, n * d) -> (..., n, L, d)."""
        return t.reshape(*t.shape[:-1], n, self.head_dim).swapaxes(-2, -3)

    def attend(self, q: mx.array, k: mx.array, v: mx.array, prefix: tuple | None) -> mx.array:
        """Causal attention of the heads ``q`` over ``k``, ``v``, after ``prefix`` = (keys, values), each
        (n, kv heads * d), which every token sees; returns (..., L, heads * d)."""
        length = q.shape[-2]
        causal = mx.triu(mx.full((length, length), -1e9), k=1)
        if prefix is not None:
            k, v = (mx.concatenate([mx.broadcast_to(self.heads(p, t.shape[-3]), (*t.shape[:-2], p.shape[0],
                                                                                  t.shape[-1])), t], axis=-2)
                    for p, t in zip(prefix, (k, v)))
            causal = mx.concatenate([mx.zeros((length, prefix[0].shape[0])), causal], axis=-1)
        groups = q.shape[-3] // k.shape[-3]
        if groups > 1:  # grouped-query attention: each key and value head serves `groups` query heads
            k, v = (mx.repeat(t, groups, axis=-3) for t in (k, v))
        scores = (q @ k.swapaxes(-1, -2)) / math.sqrt(q.shape[-1]) + causal
        mixed = (self.softmax(scores) @ v).swapaxes(-2, -3)
        return mixed.reshape(*mixed.shape[:-2], q.shape[-3] * q.shape[-1])

    def attention(self, params: dict, h: mx.array, prefix: tuple | None = None, offset: int = 0,
                  record: list | None = None) -> mx.array:
        q = self.rotary(self.heads(self.linear(params["q_proj"], h), self.num_heads), offset)
        k = self.rotary(self.heads(self.linear(params["k_proj"], h), self.num_kv_heads), offset)
        v = self.heads(self.linear(params["v_proj"], h), self.num_kv_heads)
        if record is not None:  # the keys and values a prefix holds: (..., L, kv heads * d)
            record.append(tuple(t.swapaxes(-2, -3).reshape(*h.shape[:-1], -1) for t in (k, v)))
        return self.linear(params["o_proj"], self.attend(q, k, v, prefix))

    def embed(self, params: dict, ids: mx.array) -> mx.array:
        """The tokens' embeddings, without positions."""
        return params["model"]["embed_tokens"][mx.maximum(ids, 0)]

    def positioned(self, params: dict, h: mx.array, offset: int) -> mx.array:
        """The input vectors with their positions, from ``offset``: Llama's are rotated in attention instead."""
        return h

    def hidden_states(self, params: dict, ids: mx.array, prompt: mx.array | None = None,
                      prefix: mx.array | None = None, record: list | None = None) -> mx.array:
        """The last layer's states after the final norm, (..., L, width): ``LlamaModel``'s last hidden state, with
        the virtual tokens' outputs left out."""
        virtual = 0 if prompt is None else prompt.shape[0]
        offset = 0 if prefix is None else prefix.shape[2]  # past keys and values shift the positions
        h = self.embed(params, ids)
        if prompt is not None:
            h = mx.concatenate([mx.broadcast_to(prompt, (*h.shape[:-2], *prompt.shape)), h], axis=-2)
        h = self.positioned(params, h, offset)
        for i, layer in enumerate(self.blocks(params)):
            layer_prefix = None if prefix is None else (prefix[i, 0], prefix[i, 1])
            h = self.block(layer, h, layer_prefix, offset, record)
        return self.final_norm(params, h)[..., virtual:, :]

    def blocks(self, params: dict) -> list:
        return params["model"]["layers"]

    def block(self, layer: dict, h: mx.array, prefix: tuple | None, offset: int, record: list | None) -> mx.array:
        h = h + self.attention(layer["self_attn"], self.rms_norm(layer["input_layernorm"], h), prefix, offset, record)
        x, mlp = self.rms_norm(layer["post_attention_layernorm"], h), layer["mlp"]
        gate = self.linear(mlp["gate_proj"], x)
        return h + self.linear(mlp["down_proj"], gate * mx.sigmoid(gate) * self.linear(mlp["up_proj"], x))

    def final_norm(self, params: dict, h: mx.array) -> mx.array:
        return self.rms_norm(params["model"]["norm"], h)

    def unembedding(self, params: dict) -> mx.array:
        """(vocabulary, width): ``lm_head``'s weight, or the token embeddings where tied."""
        return params["model"]["embed_tokens"] if self.tied else params["lm_head"]

    def features(self, params: dict, x: mx.array, prompt: mx.array | None = None, prefix: mx.array | None = None,
                 record: list | None = None) -> mx.array:
        """A language model's next-token logits (..., L, vocabulary); a classifier's pooled state (..., width).
        ``prompt``: (n, width) vectors before the tokens; ``prefix``: (layers, 2, n, kv heads * d) keys and values
        before the tokens' own in every layer."""
        ids = x.astype(mx.int32)
        h = self.hidden_states(params, ids, prompt, prefix, record)
        if self.generates:
            return h @ self.unembedding(params).T
        real = (ids >= 0).astype(mx.float32)
        if self.cfg.pooling == LastOrMean.mean:
            return (h * real[..., None]).sum(axis=-2) / real.sum(axis=-1, keepdims=True)
        last = (real.sum(axis=-1) - 1).astype(mx.int32)  # right padding: the last real token
        return mx.take_along_axis(h, last[..., None, None], axis=-2).squeeze(-2)

    def head_output(self, head: dict, features: mx.array) -> mx.array:
        return features if self.generates else self.linear(head, features)

    def real_tokens(self, x: mx.array) -> tuple[np.ndarray, mx.array]:
        """``x`` as rows of ids (sequences, L) and the flat indices of its real (non-pad) tokens."""
        ids = np.asarray(x).reshape(-1, np.asarray(x).shape[-1])
        return ids, mx.array(np.flatnonzero(ids.reshape(-1) != PAD))

    def token_embeddings(self, params: dict, x: mx.array) -> mx.array:
        """The embedded real tokens of ``x``, (tokens, width): what sampled prompts start from."""
        ids, real = self.real_tokens(x)
        embedded = self.embed(params, mx.array(ids))
        return embedded.reshape(-1, embedded.shape[-1])[real]

    def token_keys_values(self, params: dict, x: mx.array) -> list[tuple[mx.array, mx.array]]:
        """Every layer's keys and values of the real tokens of ``x``, each (tokens, kv heads * d): where sampled
        prefixes start."""
        ids, real = self.real_tokens(x)
        record: list = []
        self.hidden_states(params, mx.array(ids), record=record)
        return [(k.reshape(-1, k.shape[-1])[real], v.reshape(-1, v.shape[-1])[real]) for k, v in record]


class GPT2(GPT2Layout, CausalLM):
    """A GPT-2 folder under ``model=causal_lm``: GPT-2's layout (``gpt2.py``) over ``CausalLM``'s tokenizing, padding
    and pooling."""


def rope_inverse_frequencies(config: dict, head_dim: int) -> mx.array:
    """1 / base^(2i / d), with Llama 3's frequency-dependent scaling where ``rope_type`` is "llama3"; the settings
    from ``rope_theta`` / ``rope_scaling`` (transformers 4) or ``rope_parameters`` (transformers 5)."""
    parameters = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or parameters
    base = config.get("rope_theta", parameters.get("rope_theta", 10000.0))
    inverse = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inverse
        scaled = np.where(wavelength > context / low, inverse / factor, inverse)
        smooth = (context / wavelength - low) / (high - low)
        medium = (wavelength >= context / high) & (wavelength <= context / low)
        inverse = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    elif kind != "default":
        raise ConfigError("model.path", f"rope_type '{kind}' is not implemented (implemented: default, llama3)")
    return mx.array(inverse.astype(np.float32))


def fill_from_hf_names(flat: dict, expected: dict, directory: Path, hf_name, transposed: bool) -> dict:
    """The tree shaped like ``expected`` filled from the arrays ``hf_name(path)`` names (2-D weights transposed to
    (in, out) where ``transposed``); a missing or misshapen array is refused, naming it."""
    def load(path: tuple, like: mx.array) -> mx.array:
        name = hf_name(path)
        if name not in flat:
            raise ConfigError("model.path", f"the weights in {directory} have no '{name}'")
        array = flat[name]
        if transposed and path[-1] == "weight" and array.ndim == 2:
            array = array.T
        if array.shape != like.shape:
            raise ConfigError("model.path", f"'{name}' in {directory} has shape {array.shape}, config.json implies "
                              f"{like.shape}")
        return array.astype(mx.float32)

    return map_with_path(load, expected)
