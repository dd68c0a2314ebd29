"""A Hugging Face ViT (ViT, DeiT without distillation, DINO) in MLX, read from a model directory, with a task head on
the [CLS] output: the pretrained image encoder of P>M>F (Hu et al., CVPR 2022).

The directory holds ``config.json`` (``model_type: vit``) and ``model.safetensors``, as ``ViTModel`` or
``ViTForImageClassification`` saves them (its ``vit.`` prefix and classifier are ignored). Parameters keep Hugging
Face's module names (``encoder.layer.0.attention.attention.query``, ...), so ``peft.target_modules=[query,value]``
names what Hugging Face peft's LoRA targets on a ViT, and adapters export under peft's names. Linear weights are
stored as (in, out); the patch projection, PyTorch's Conv2d (hidden, channels, p, p) with stride p, is the linear
layer ``(channels * p * p, hidden)`` over flattened patches (channel, row, column order), and is the input layer
(``all-linear`` leaves it out).

The forward pass is ``ViTModel``'s in inference mode: patches embedded, [CLS] prepended, position embeddings added,
pre-norm layers (exact GELU), the final LayerNorm; the pooled output is the [CLS] token's (``model.pooling=cls``,
what DINO and P>M>F use; ``ViTModel``'s pooler, a dense layer with tanh trained for ImageNet-21k classification, is
not used) or the mean over the patch tokens (``mean``). Images are (height, width, channels), channels last, as the
colour-image tasks give them; their size must be the checkpoint's ``image_size`` (position embeddings are not
interpolated: set ``task.image_size``), and their normalization is the task's (for a pretrained checkpoint, set
``task.channel_mean`` / ``task.channel_std`` to its ``preprocessor_config.json``'s ``image_mean`` / ``image_std``).
Prompt vectors (prompt tuning, VPT-shallow) are inserted after [CLS] and attended to by every token; prefix keys and
values (prefix tuning) are prepended in every attention layer.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING

from metapeft.backend import mx
from metapeft.errors import ConfigError, require
from metapeft.models.gelu import gelu
from metapeft.models.hf_encoder import Pooling
from metapeft.models.hf_files import model_directory
from metapeft.models.layers import Backbone, init_linear, with_prefix
from metapeft.models.native_ops import KernelKind, transformer_ops
from metapeft.models.softmax import SoftmaxKind, attention_softmax
from metapeft.registry import MODELS
from metapeft.trees import leaves_with_paths, map_with_path

REQUIRED_FILES = ("config.json", "model.safetensors")


@dataclass
class HFViTConfig:
    name: str = "hf_vit"
    path: str = MISSING  # a Hugging Face ViT model directory (config.json, model.safetensors)
    pooling: Pooling = Pooling.cls
    default_outer_lr: float = 0.0003  # as model=hf_encoder's: a pretrained transformer under Adam
    softmax: SoftmaxKind = SoftmaxKind.polynomial  # attention's (metapeft/models/softmax.py), as model=hf_encoder's
    kernels: KernelKind = KernelKind.auto  # layer norm, softmax and GELU, as model=hf_encoder's


@MODELS.register("hf_vit", HFViTConfig)
class HFViT(Backbone):
    supports_prompts = True
    supports_prefixes = True
    input_layer = ("embeddings", "patch_embeddings", "projection")

    def __init__(self, cfg: HFViTConfig, input_shape: tuple[int, ...], output_dim: int):
        self.cfg = cfg
        self.directory = model_directory(cfg.path, "", REQUIRED_FILES)
        self.config = c = json.loads((self.directory / "config.json").read_text())
        require(c.get("model_type") == "vit", "model.path", f"{self.directory} holds a '{c.get('model_type')}' "
                "model; model=hf_vit reads model_type 'vit' (ViT, DeiT, DINO)")
        require(c.get("hidden_act", "gelu") == "gelu", "model.path",
                f"only hidden_act 'gelu' is implemented, {self.directory} uses '{c.get('hidden_act')}'")
        require(c.get("qkv_bias", True), "model.path", f"{self.directory} has qkv_bias false; only ViTs with query, "
                "key and value biases are implemented")
        self.image_size, self.patch, self.channels = c["image_size"], c["patch_size"], c.get("num_channels", 3)
        shape = tuple(input_shape)
        require(len(shape) == 3 and shape[-1] == self.channels, "model", f"model=hf_vit reads images (height, "
                f"width, {self.channels}); this task's examples have shape {shape}: use a colour-image task")
        require(shape[:2] == (self.image_size, self.image_size), "task.image_size",
                f"the checkpoint in {self.directory} reads {self.image_size}x{self.image_size} images (its position "
                f"embeddings are not interpolated); this task gives {shape[0]}x{shape[1]}: set "
                f"task.image_size={self.image_size}")
        self.grid = self.image_size // self.patch
        self.width, self.num_heads = c["hidden_size"], c["num_attention_heads"]
        self.eps = c.get("layer_norm_eps", 1e-12)
        self.input_shape = shape
        self.output_dim = output_dim
        self.ops = transformer_ops(cfg.kernels, attention_softmax(cfg.softmax), gelu)
        self.softmax = self.ops.softmax

    # --- parameters -----------------------------------------------------------------------------------------------

    def init(self, key: mx.array) -> dict:
        """A randomly initialized ViT of this architecture (N(0, 0.02) weights, as ViT's), with a task head; the
        checkpoint's weights come from ``pretrained``."""
        c, std, h = self.config, self.config.get("initializer_range", 0.02), self.width
        keys = iter(mx.random.split(key, 4 + 6 * c["num_hidden_layers"]))

        def linear(fan_in, fan_out):
            return {"weight": std * mx.random.normal((fan_in, fan_out), key=next(keys)), "bias": mx.zeros((fan_out,))}

        def norm():
            return {"scale": mx.ones((h,)), "bias": mx.zeros((h,))}

        f = c["intermediate_size"]
        return {
            "embeddings": {
                "cls_token": std * mx.random.normal((1, 1, h), key=next(keys)),
                "position_embeddings": std * mx.random.normal((1, self.grid ** 2 + 1, h), key=next(keys)),
                "patch_embeddings": {"projection": linear(self.channels * self.patch ** 2, h)},
            },
            "encoder": {"layer": [{
                "layernorm_before": norm(),
                "attention": {"attention": {n: linear(h, h) for n in ("query", "key", "value")},
                              "output": {"dense": linear(h, h)}},
                "layernorm_after": norm(),
                "intermediate": {"dense": linear(h, f)},
                "output": {"dense": linear(f, h)},
            } for _ in range(c["num_hidden_layers"])]},
            "layernorm": norm(),
            "head": init_linear(next(keys), h, self.output_dim),
        }

    def pretrained(self, key: mx.array, num_outputs: int) -> tuple[dict, dict]:
        """The checkpoint's weights in this model's tree (with a fresh head of ``num_outputs``) and their source."""
        flat = mx.load(str(self.directory / "model.safetensors"))
        flat = {k.removeprefix("vit."): v for k, v in flat.items()}
        tree = from_hf_names(flat, self.init(mx.random.key(0)), self.directory)
        tree["head"] = init_linear(key, self.width, num_outputs)
        return tree, {"source": str(self.directory)}

    def hf_state_dict(self, tree: dict) -> dict:
        """The backbone of ``tree`` under Hugging Face's names and PyTorch's layouts (what export writes)."""
        return to_hf_names(tree, self.channels, self.patch)

    @staticmethod
    def hf_module_name(name: str) -> str:
        """A module's name in the installed transformers' ``ViTModel``, as a peft adapter must name it. transformers
        5 renamed ViT's modules (``encoder.layer.0.attention.attention.query`` is ``layers.0.attention.q_proj``)
        while its checkpoints keep the old names; where transformers is installed, its own renaming applies, and
        otherwise the checkpoint's names are kept (the modules' names in transformers 4)."""
        try:
            from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        except ImportError:
            return name
        for rule in get_checkpoint_conversion_mapping("ViTModel") or []:
            name, _ = rule.rename_source_key(name)
        return name

    # --- forward --------------------------------------------------------------------------------------------------

    def layer_norm(self, params: dict, x: mx.array) -> mx.array:
        return self.ops.layer_norm(x, params["scale"], params["bias"], self.eps)

    def patches(self, x: mx.array) -> mx.array:
        """(..., H, W, C) -> (..., patches, C * p * p): row-major patches, each flattened channel, row, column as
        PyTorch's Conv2d weight is."""
        batch, p, g = x.shape[:-3], self.patch, self.grid
        x = x[..., : g * p, : g * p, :].reshape(-1, g, p, g, p, self.channels)
        x = x.transpose(0, 1, 3, 5, 2, 4)  # (n, rows, cols, C, p, p)
        return x.reshape(*batch, g * g, self.channels * p * p)

    def patch_embeddings(self, params: dict, x: mx.array) -> mx.array:
        return self.linear(params["embeddings"]["patch_embeddings"]["projection"], self.patches(x))

    def token_embeddings(self, params: dict, x: mx.array) -> mx.array:
        """Every patch of ``x`` embedded without its position, (patches, width): where sampled prompts start."""
        tokens = self.patch_embeddings(params, x)
        return tokens.reshape(-1, tokens.shape[-1])

    def embed(self, params: dict, x: mx.array) -> mx.array:
        e = params["embeddings"]
        tokens = self.patch_embeddings(params, x)
        cls = mx.broadcast_to(e["cls_token"][0], (*tokens.shape[:-2], 1, self.width))
        return mx.concatenate([cls, tokens], axis=-2) + e["position_embeddings"][0]

    def attention(self, params: dict, h: mx.array, prefix: tuple | None = None, record: list | None = None
                  ) -> mx.array:
        heads, width = self.num_heads, h.shape[-1]
        q, k, v = (self.linear(params["attention"][n], h) for n in ("query", "key", "value"))
        if record is not None:
            record.append((k, v))
        k, v = with_prefix(prefix, k, v)

        def split_heads(t):
            return t.reshape(*t.shape[:-1], heads, width // heads).swapaxes(-2, -3)

        q, k, v = split_heads(q), split_heads(k), split_heads(v)
        scores = (q @ k.swapaxes(-1, -2)) / math.sqrt(width // heads)
        mixed = (self.softmax(scores) @ v).swapaxes(-2, -3)
        return self.linear(params["output"]["dense"], mixed.reshape(*mixed.shape[:-2], width))

    def token_keys_values(self, params: dict, x: mx.array) -> list[tuple[mx.array, mx.array]]:
        """Every layer's keys and values of every token of ``x``, each (tokens, width): where sampled prefixes
        start."""
        record: list = []
        self.features(params, x, record=record)
        return [(k.reshape(-1, k.shape[-1]), v.reshape(-1, v.shape[-1])) for k, v in record]

    def features(self, params: dict, x: mx.array, prompt: mx.array | None = None, prefix: mx.array | None = None,
                 record: list | None = None) -> mx.array:
        """``prompt``: (n, width) vectors inserted after [CLS]; ``prefix``: (layers, 2, n, width) keys and values
        prepended in every attention layer."""
        h = self.embed(params, x)
        if prompt is not None:
            prompts = mx.broadcast_to(prompt, (*h.shape[:-2], *prompt.shape))
            h = mx.concatenate([h[..., :1, :], prompts, h[..., 1:, :]], axis=-2)
        for i, layer in enumerate(params["encoder"]["layer"]):
            layer_prefix = None if prefix is None else (prefix[i, 0], prefix[i, 1])
            h = h + self.attention(layer["attention"], self.layer_norm(layer["layernorm_before"], h), layer_prefix,
                                   record)
            normalized = self.layer_norm(layer["layernorm_after"], h)
            hidden = self.ops.gelu(self.linear(layer["intermediate"]["dense"], normalized))
            h = h + self.linear(layer["output"]["dense"], hidden)
        h = self.layer_norm(params["layernorm"], h)
        if self.cfg.pooling == Pooling.cls:
            return h[..., 0, :]
        return h[..., h.shape[-2] - self.grid ** 2:, :].mean(axis=-2)  # the patches' outputs, prompts left out


# Hugging Face's names <-> this model's: LayerNorm "weight" is "scale" here, linear weights are transposed, the patch
# projection is a Conv2d there.
NORMS = ("layernorm_before", "layernorm_after", "layernorm")


def hf_name(path: tuple, leaf: str) -> str:
    name = ".".join(str(k) for k in (*path, leaf))
    if path and path[-1] in NORMS and leaf == "scale":
        return name.removesuffix(".scale") + ".weight"
    return name


def from_hf_names(flat: dict, expected: dict, directory: Path) -> dict:
    """The tree shaped like ``expected`` (its head left out) filled from Hugging Face-named arrays; a missing or
    misshapen array is refused, naming it."""
    def load(path: tuple, like: mx.array) -> mx.array:
        name = hf_name(path[:-1], path[-1])
        if name not in flat:
            raise ConfigError("model.path", f"{directory / 'model.safetensors'} has no '{name}'; is it a ViT "
                              f"checkpoint? (files needed: {', '.join(REQUIRED_FILES)})")
        array = flat[name]
        if path[-1] == "weight" and array.ndim == 4:  # the patch projection: Conv2d (out, C, p, p)
            array = array.reshape(array.shape[0], -1)
        if path[-1] == "weight" and array.ndim == 2:
            array = array.T
        if array.shape != like.shape:
            raise ConfigError("model.path", f"'{name}' in {directory} has shape {array.shape}, config.json implies "
                              f"{like.shape}")
        return array.astype(mx.float32)

    return map_with_path(load, {k: v for k, v in expected.items() if k != "head"})


def to_hf_names(tree: dict, channels: int, patch: int) -> dict:
    """The inverse of ``from_hf_names``: Hugging Face names, PyTorch layouts (for export)."""
    out = {}
    for path, value in leaves_with_paths({k: v for k, v in tree.items() if k != "head"}):
        if path[-1] == "weight" and value.ndim == 2:
            value = value.T
            if path[:-1] == HFViT.input_layer:
                value = value.reshape(value.shape[0], channels, patch, patch)
        out[hf_name(path[:-1], path[-1])] = value
    return out

