"""Which linear layers of a backbone a PEFT method adapts, shared by every method that targets layers
(as Hugging Face peft's ``tuners_utils`` is).

A target names a path component (``query``, ``attention``, ``mlp``, ``hidden``), a whole path (``layers.0.mlp.fc1``,
``hidden.1``), the end of a path (``attention.output.dense``: as Hugging Face peft matches module names) or
``all-linear``: every linear layer but the one reading the raw input and the head.
"""
from __future__ import annotations

from typing import Sequence

from metapeft.errors import require
from metapeft.models.layers import Backbone
from metapeft.trees import Path, linear_layers, path_name


def without_head(backbone: dict) -> dict:
    return {k: v for k, v in backbone.items() if k != "head"}


def matches(target: str, path: Path, input_layer: Path) -> bool:
    if target == "all-linear":
        return path[: len(input_layer)] != input_layer
    name = path_name(path)
    return target == name or name.endswith(f".{target}") or target in {str(k) for k in path}


def target_layers(model: Backbone, backbone: dict, targets: Sequence[str],
                  key: str = "peft.target_modules") -> list[tuple[Path, dict]]:
    """The linear layers of ``backbone`` (its head excluded) that ``targets`` select, with their paths.
    A target that selects nothing is refused, naming ``key`` and the valid targets."""
    layers = list(linear_layers(without_head(backbone)))
    valid = sorted({"all-linear", *(str(k) for p, _ in layers for k in p if isinstance(k, str)),
                    *(path_name(p) for p, _ in layers)})
    require(len(targets) > 0, key, f"must name at least one of {valid}")
    for target in targets:
        require(any(matches(target, p, model.input_layer) for p, _ in layers), key,
                f"'{target}' matches no linear layer of model={type(model).__name__.lower()}; valid: {valid}")
    return [(p, layer) for p, layer in layers if any(matches(t, p, model.input_layer) for t in targets)]
