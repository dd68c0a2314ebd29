"""BitFit (Ben Zaken et al., 2022): adapt only the backbone's bias terms.

Every bias of the backbone (linear layers, and the normalization layers' shifts unless ``include_norms`` is false)
is copied into the adapted tree, which the forward pass reads in place of the frozen one; the weights stay frozen.
The copies are the backbone's own values, so at initialization the model equals the backbone exactly. It has no
Hugging Face peft format; ``runners/export.py --merge`` writes the model with the adapted biases.

Under ``algorithm.meta_learn=backbone|both`` the outer loop learns the backbone's weights; the biases are the
adapter's (their start is the pretrained biases under ``backbone``, meta-learned under ``both``).
"""
from __future__ import annotations

from dataclasses import dataclass

from metapeft.backend import mx
from metapeft.errors import require
from metapeft.peft.base import PeftConfig, PeftMethod
from metapeft.peft.targets import without_head
from metapeft.registry import PEFT_METHODS
from metapeft.trees import Path, get_in, merge, path_name, paths_holding, set_in

NORMS = ("LayerNorm", "attention_norm", "mlp_norm", "final_norm", "norm")  # normalization layers' names here


@dataclass
class BitFitConfig(PeftConfig):
    name: str = "bitfit"
    include_norms: bool = True  # the normalization layers' biases too, as the paper's BERT experiments


@PEFT_METHODS.register("bitfit", BitFitConfig)
class BitFit(PeftMethod):
    def bias_paths(self, backbone: dict) -> list[Path]:
        return [path for path in paths_holding(without_head(backbone), "bias")
                if self.cfg.include_norms or not set(map(str, path)) & set(NORMS)]

    def check(self, backbone: dict) -> None:
        require(len(paths_holding(without_head(backbone), "bias")) > 0, "peft",
                f"model={type(self.model).__name__.lower()} has no biases (as Llama's): BitFit would train nothing; "
                "choose another method (lora, dora, ia3, ...)")
        require(len(self.bias_paths(backbone)) > 0, "peft.include_norms",
                f"model={type(self.model).__name__.lower()} has no bias outside its normalization layers; "
                "set peft.include_norms=true")

    def init_adapter(self, backbone: dict, key: mx.array, sample_inputs: mx.array) -> dict:
        adapter: dict = {}
        for path in self.bias_paths(backbone):
            set_in(adapter, path, {"bias": mx.array(get_in(backbone, path)["bias"])})
        return adapter

    def learnable_backbone(self, frozen: dict) -> dict:
        """Everything but the biases the adapter holds."""
        adapted = {path_name(p) for p in self.bias_paths(frozen)}
        return without_biases(frozen, adapted)

    def merged(self, adapted: dict, frozen: dict) -> dict:
        return merge(frozen, without_head(adapted))


def without_biases(tree, paths: set[str], path: Path = ()):
    """``tree`` without the ``bias`` of the layers at ``paths`` (dotted names)."""
    if isinstance(tree, dict):
        return {k: without_biases(v, paths, (*path, k)) for k, v in tree.items()
                if not (k == "bias" and path_name(path) in paths)}
    if isinstance(tree, list):
        return [without_biases(v, paths, (*path, i)) for i, v in enumerate(tree)]
    return tree
