"""A Hugging Face decoder-only language model (Llama, Qwen2, Mistral; GPT-2 in ``gpt2.py``) in MLX, read from a
local folder, as a few-shot text classifier: a task head on the hidden state of each text's last token, as
``LlamaForSequenceClassification`` reads it.

The folder holds ``config.json``, ``tokenizer.json`` and the weights as ``model.safetensors`` or shards listed in
``model.safetensors.index.json`` (float32, float16 or bfloat16; computed in float32). Parameters keep Hugging Face's
names (``model.layers.0.self_attn.q_proj``, ...), so ``peft.target_modules=[q_proj,v_proj]`` names what Hugging
Face peft's LoRA targets on these models. Linear weights are stored as (in, out); the token embeddings as an array
(not a layer PEFT methods adapt); ``lm_head`` is not read, since the head is the task's.

The forward pass is ``LlamaModel``'s in inference mode: RMSNorm before attention and before the SwiGLU MLP,
rotary position embeddings (Hugging Face's half-rotation layout; Llama 3's ``rope_scaling`` and transformers 5's
``rope_parameters`` read), grouped-query attention with a causal mask, the final RMSNorm. Qwen2 adds biases to the
query, key and value projections; Llama's ``attention_bias`` / ``mlp_bias`` are read too. Texts are right-padded with
-1 (no token id), so the causal mask alone keeps padding out of every real token's state; the pooled state is the
last real token's (``model.pooling=last``) or the mean over the real tokens (``mean``).

Not yet here (they need the generative head and text-to-text tasks): scoring answers by likelihood, generation, the
zero-shot and in-context baselines, prompt and prefix tuning.
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
            "head": init_linear(next(keys), h, self.output_dim),
        }

    def pretrained(self, key: mx.array, num_outputs: int) -> tuple[dict, dict]:
        """The checkpoint's weights in this model's tree (with a fresh head of ``num_outputs``) and their source."""
        flat: dict = {}
        for path in weight_files(self.directory):  # a GPT2LMHeadModel's body is under "transformer."
            flat.update({k.removeprefix("transformer."): v for k, v in mx.load(str(path)).items()})
        expected = self.init(mx.random.key(0))
        tree = fill_from_hf_names(flat, {k: v for k, v in expected.items() if k != "head"}, self.directory,
                                  self.hf_name, self.transposed)
        tree["head"] = init_linear(key, self.width, num_outputs)
        return tree, {"source": str(self.directory)}

    @staticmethod
    def hf_name(path: tuple) -> str:
        """A parameter's name in the checkpoint (the embeddings, an array here, are ``embed_tokens.weight``)."""
        return ".".join(str(k) for k in path) + (".weight" if path[-1] == "embed_tokens" else "")

    transposed = True  # PyTorch's nn.Linear stores (out, in)

    def hf_state_dict(self, tree: dict) -> dict:
        """The body of ``tree`` under the checkpoint's names and layouts (what export writes; no ``lm_head``)."""
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

    def rotary(self, x: mx.array) -> mx.array:
        """Rotary position embeddings in Hugging Face's layout (the halves of each head rotated), positions from 0."""
        positions = mx.arange(x.shape[-2], dtype=mx.float32)
        angles = positions[:, None] * self.inverse_frequencies[None, :]
        cos, sin = mx.cos(mx.concatenate([angles, angles], -1)), mx.sin(mx.concatenate([angles, angles], -1))
        half = x.shape[-1] // 2
        rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def attention(self, params: dict, h: mx.array) -> mx.array:
        length = h.shape[-2]

        def heads(t, n):  # (..., L, n * d) -> (..., n, L, d)
            return t.reshape(*t.shape[:-1], n, self.head_dim).swapaxes(-2, -3)

        q = self.rotary(heads(self.linear(params["q_proj"], h), self.num_heads))
        k = self.rotary(heads(self.linear(params["k_proj"], h), self.num_kv_heads))
        v = heads(self.linear(params["v_proj"], h), self.num_kv_heads)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:  # grouped-query attention: each key and value head serves `groups` query heads
            k, v = (mx.repeat(t, groups, axis=-3) for t in (k, v))
        causal = mx.triu(mx.full((length, length), -1e9), k=1)
        scores = (q @ k.swapaxes(-1, -2)) / math.sqrt(self.head_dim) + causal
        mixed = (self.softmax(scores) @ v).swapaxes(-2, -3)
        return self.linear(params["o_proj"], mixed.reshape(*mixed.shape[:-2], self.num_heads * self.head_dim))

    def hidden_states(self, params: dict, ids: mx.array) -> mx.array:
        """The last layer's states after the final norm, (..., L, width): ``LlamaModel``'s last hidden state."""
        model = params["model"]
        h = model["embed_tokens"][mx.maximum(ids, 0)]
        for layer in model["layers"]:
            h = h + self.attention(layer["self_attn"], self.rms_norm(layer["input_layernorm"], h))
            x, mlp = self.rms_norm(layer["post_attention_layernorm"], h), layer["mlp"]
            gate = self.linear(mlp["gate_proj"], x)
            h = h + self.linear(mlp["down_proj"], gate * mx.sigmoid(gate) * self.linear(mlp["up_proj"], x))
        return self.rms_norm(model["norm"], h)

    def features(self, params: dict, x: mx.array) -> mx.array:
        ids = x.astype(mx.int32)
        real = (ids >= 0).astype(mx.float32)
        h = self.hidden_states(params, ids)
        if self.cfg.pooling == LastOrMean.mean:
            return (h * real[..., None]).sum(axis=-2) / real.sum(axis=-1, keepdims=True)
        last = (real.sum(axis=-1) - 1).astype(mx.int32)  # right padding: the last real token
        return mx.take_along_axis(h, last[..., None, None], axis=-2).squeeze(-2)



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
