"""GPT-2's layer layout for ``model=causal_lm`` (a folder whose ``config.json`` says ``model_type: gpt2``; the
model is ``causal_lm.GPT2``, this layout over ``CausalLM``): ``GPT2Model``'s
forward in inference mode, learned positions, pre-norm LayerNorm blocks, attention from one fused ``c_attn``
projection, the MLP with GELU's tanh form (``activation_function: gelu_new``), the final ``ln_f``.

Parameters keep Hugging Face's names (``h.0.attn.c_attn``, ``h.0.mlp.c_fc``, ...; a ``GPT2LMHeadModel``'s
``transformer.`` prefix is dropped), so ``peft.target_modules=[c_attn]`` is what Hugging Face peft's LoRA targets.
Its ``Conv1D`` layers already store weights as (in, out), as every model here computes ``x @ W``: nothing is
transposed. Everything else (tokenizing, right padding, pooling, the logits, prompts and prefixes) is ``CausalLM``'s.
"""
from __future__ import annotations

import math

from metapeft.backend import mx
from metapeft.errors import require


class GPT2Layout:
    """What GPT-2 changes in ``CausalLM``: its config keys, parameter tree, names and forward pass."""

    input_layer = ("wte",)

    def read_architecture(self, c: dict) -> None:
        require(c.get("activation_function", "gelu_new") == "gelu_new", "model.path", "only activation_function "
                f"'gelu_new' is implemented, {self.directory} uses '{c.get('activation_function')}'")
        self.width, self.num_heads = c["n_embd"], c["n_head"]
        self.head_dim = self.width // self.num_heads
        self.num_kv_heads = self.num_heads
        self.eps = c.get("layer_norm_epsilon", 1e-5)
        require(self.cfg.max_length <= c["n_positions"], "model.max_length",
                f"must be <= {c['n_positions']} (the model's positions), got {self.cfg.max_length}")

    def init(self, key: mx.array) -> dict:
        c, std, h = self.config, self.config.get("initializer_range", 0.02), self.width
        keys = iter(mx.random.split(key, 3 + 4 * c["n_layer"]))
        inner = c.get("n_inner") or 4 * h

        def linear(fan_in, fan_out):
            return {"weight": std * mx.random.normal((fan_in, fan_out), key=next(keys)), "bias": mx.zeros((fan_out,))}

        def norm():
            return {"weight": mx.ones((h,)), "bias": mx.zeros((h,))}

        return {
            "wte": std * mx.random.normal((c["vocab_size"], h), key=next(keys)),
            "wpe": std * mx.random.normal((c["n_positions"], h), key=next(keys)),
            "h": [{"ln_1": norm(), "attn": {"c_attn": linear(h, 3 * h), "c_proj": linear(h, h)},
                   "ln_2": norm(), "mlp": {"c_fc": linear(h, inner), "c_proj": linear(inner, h)}}
                  for _ in range(c["n_layer"])],
            "ln_f": norm(),
            **self.output_layer(next(keys), (c["vocab_size"], h)),
        }

    @staticmethod
    def hf_name(path: tuple) -> str:
        return ".".join(str(k) for k in path) + (".weight" if path[-1] in ("wte", "wpe") else "")

    transposed = False  # Conv1D stores (in, out)
    hf_fan_in_fan_out = True  # peft's LoRA over Conv1D layers

    @staticmethod
    def hf_module_name(name: str) -> str:
        """``GPT2LMHeadModel`` keeps the body under ``transformer.``."""
        return f"transformer.{name}"

    @property
    def context_length(self) -> int:
        return self.config["n_positions"]

    @property
    def num_positions(self) -> int:
        """Learned positions: the virtual tokens of prefix tuning must fit beside ``model.max_length``."""
        return self.config["n_positions"]

    def layer_norm(self, params: dict, x: mx.array) -> mx.array:
        return mx.fast.layer_norm(x, params["weight"], params["bias"], self.eps)

    def attention(self, params: dict, h: mx.array, prefix: tuple | None = None, offset: int = 0,
                  record: list | None = None) -> mx.array:
        q, k, v = mx.split(self.linear(params["c_attn"], h), 3, axis=-1)
        if record is not None:
            record.append((k, v))
        heads = lambda t: self.heads(t, self.num_heads)
        return self.linear(params["c_proj"], self.attend(heads(q), heads(k), heads(v), prefix))

    def embed(self, params: dict, ids: mx.array) -> mx.array:
        return params["wte"][mx.maximum(ids, 0)]

    def positioned(self, params: dict, h: mx.array, offset: int) -> mx.array:
        return h + params["wpe"][offset: offset + h.shape[-2]]

    def blocks(self, params: dict) -> list:
        return params["h"]

    def block(self, layer: dict, h: mx.array, prefix: tuple | None, offset: int, record: list | None) -> mx.array:
        """``GPT2Block``: pre-norm attention and MLP."""
        h = h + self.attention(layer["attn"], self.layer_norm(layer["ln_1"], h), prefix, offset, record)
        return h + self.linear(layer["mlp"]["c_proj"], gelu_tanh(self.linear(layer["mlp"]["c_fc"],
                                                                               self.layer_norm(layer["ln_2"], h))))

    def final_norm(self, params: dict, h: mx.array) -> mx.array:
        return self.layer_norm(params["ln_f"], h)

    def unembedding(self, params: dict) -> mx.array:
        return params["wte"]  # GPT-2's lm_head is tied to its token embeddings


def gelu_tanh(x: mx.array) -> mx.array:
    """GPT-2's GELU (``gelu_new``): 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
