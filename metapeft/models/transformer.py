"""A small pre-norm transformer encoder over token sequences, with a task head on the mean-pooled output.

A digit image is 8 row-tokens of 8 pixels; a sinusoid input is one token. Learned position embeddings; optional
prompt vectors (prompt tuning) are prepended after embedding and carry no position; prefix keys and values (prefix
tuning) are prepended in every attention layer. Pooling averages the outputs of the input tokens only, so prompts
act through attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from metapeft.backend import mx
from metapeft.errors import require
from metapeft.models.layers import Backbone, init_layer_norm, init_linear, layer_norm, with_prefix
from metapeft.registry import MODELS


@dataclass
class TransformerConfig:
    name: str = "transformer"
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = 2  # feed-forward width = mlp_ratio * hidden_size


@MODELS.register("transformer", TransformerConfig)
class Transformer(Backbone):
    supports_prompts = True
    supports_prefixes = True
    input_layer = ("embed",)

    def __init__(self, cfg: TransformerConfig, input_shape: tuple[int, ...], output_dim: int):
        for key in ("hidden_size", "num_layers", "num_heads", "mlp_ratio"):
            require(getattr(cfg, key) > 0, f"model.{key}", f"must be > 0, got {getattr(cfg, key)}")
        require(cfg.hidden_size % cfg.num_heads == 0, "model.num_heads",
                f"must divide model.hidden_size={cfg.hidden_size}, got {cfg.num_heads}")
        self.cfg = cfg
        self.input_shape = tuple(input_shape)
        self.num_tokens, self.token_dim = (1, input_shape[0]) if len(input_shape) == 1 else input_shape
        self.output_dim = output_dim
        self.width = cfg.hidden_size

    def init(self, key: mx.array) -> dict:
        h, f = self.cfg.hidden_size, self.cfg.mlp_ratio * self.cfg.hidden_size
        keys = iter(mx.random.split(key, 3 + 6 * self.cfg.num_layers))
        layers = [{
            "attention_norm": init_layer_norm(h),
            "attention": {name: init_linear(next(keys), h, h) for name in ("query", "key", "value", "out")},
            "mlp_norm": init_layer_norm(h),
            "mlp": {"fc1": init_linear(next(keys), h, f), "fc2": init_linear(next(keys), f, h)},
        } for _ in range(self.cfg.num_layers)]
        return {
            "embed": init_linear(next(keys), self.token_dim, h),
            "position": 0.02 * mx.random.normal((self.num_tokens, h), key=next(keys)),
            "layers": layers,
            "final_norm": init_layer_norm(h),
            "head": init_linear(next(keys), h, self.output_dim),
        }

    def tokens(self, x: mx.array) -> mx.array:
        """(..., *input_shape) -> (..., num_tokens, token_dim)."""
        return x.reshape(*x.shape[: x.ndim - len(self.input_shape)], self.num_tokens, self.token_dim)

    def token_embeddings(self, params: dict, x: mx.array) -> mx.array:
        """Every input token of ``x`` embedded without its position, (tokens, width): where sampled prompts start."""
        tokens = self.linear(params["embed"], self.tokens(x))
        return tokens.reshape(-1, tokens.shape[-1])

    def embed(self, params: dict, x: mx.array) -> mx.array:
        return self.linear(params["embed"], self.tokens(x)) + params["position"]

    def attention(self, params: dict, h: mx.array, prefix: tuple | None = None, record: list | None = None
                  ) -> mx.array:
        """Multi-head self-attention; ``prefix``: (keys, values), each (n, width), attended to before the tokens'
        own (prefix tuning); ``record`` collects the tokens' keys and values."""
        heads, width = self.cfg.num_heads, h.shape[-1]
        q, k, v = (self.linear(params[n], h) for n in ("query", "key", "value"))
        if record is not None:
            record.append((k, v))
        k, v = with_prefix(prefix, k, v)

        def split_heads(t):
            return t.reshape(*t.shape[:-1], heads, width // heads).swapaxes(-2, -3)

        q, k, v = split_heads(q), split_heads(k), split_heads(v)
        scores = (q @ k.swapaxes(-1, -2)) / math.sqrt(width // heads)
        mixed = (mx.softmax(scores, axis=-1) @ v).swapaxes(-2, -3)
        return self.linear(params["out"], mixed.reshape(*mixed.shape[:-2], width))

    def token_keys_values(self, params: dict, x: mx.array) -> list[tuple[mx.array, mx.array]]:
        """Every layer's keys and values of every input token of ``x``, each (tokens, width): where sampled
        prefixes start."""
        record: list = []
        self.features(params, x, record=record)
        return [(k.reshape(-1, k.shape[-1]), v.reshape(-1, v.shape[-1])) for k, v in record]

    def features(self, params: dict, x: mx.array, prompt: mx.array | None = None, prefix: mx.array | None = None,
                 record: list | None = None) -> mx.array:
        """``prompt``: (n, width) vectors prepended to the tokens; ``prefix``: (layers, 2, n, width) keys and
        values prepended in every attention layer."""
        h = self.embed(params, x)
        if prompt is not None:
            h = mx.concatenate([mx.broadcast_to(prompt, (*h.shape[:-2], *prompt.shape)), h], axis=-2)
        for i, layer in enumerate(params["layers"]):
            layer_prefix = None if prefix is None else (prefix[i, 0], prefix[i, 1])
            h = h + self.attention(layer["attention"], layer_norm(layer["attention_norm"], h), layer_prefix, record)
            mlp = layer["mlp"]
            h = h + self.linear(mlp["fc2"], mx.maximum(self.linear(mlp["fc1"], layer_norm(layer["mlp_norm"], h)), 0))
        return mx.mean(layer_norm(params["final_norm"], h)[..., -self.num_tokens:, :], axis=-2)
