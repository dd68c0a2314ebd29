"""Meta-learned adapters in formats other tools load: a Hugging Face PEFT adapter directory, or a merged model.

For a ``model=hf_encoder`` run with ``peft=lora`` or ``peft=adalora``, ``peft_adapter`` writes the meta-learned
initialization as ``adapter_config.json`` + ``adapter_model.safetensors`` under Hugging Face peft's key names and
layouts (PyTorch's (out, in)):

    LoRA     base_model.model.<module>.lora_A.weight  (r, in)  = A^T     lora_B.weight (out, r) = B^T
             scaling lora_alpha / r = ours (alpha / rank)
    AdaLoRA  lora_A (r, in) = P^T,  lora_E (r, 1) = lambda * mask (pruned triplets exported as zeros),
             lora_B (out, r) = Q^T; peft scales by lora_alpha / ranknum with ranknum = init_r, as ours

``merged_model`` writes the backbone with the update folded into each targeted layer (W + scale * delta) as a
Hugging Face model directory (``model.safetensors``, the source's ``config.json`` and tokenizer files). The task head,
which a BERT encoder has no place for, goes beside either as ``head.safetensors`` (a ``torch.nn.Linear`` state dict:
``weight`` (n_way, hidden), ``bias``); it is the meta-learned head a task's adaptation starts from.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from metapeft import io
from metapeft.api import LearnedInitialization
from metapeft.backend import mx
from metapeft.errors import ConfigError, require
from metapeft.models.hf_encoder import to_hf_names
from metapeft.trees import get_in, merge, path_name, paths_holding, set_in

PEFT_FORMATS = ("lora", "adalora")
PREFIX = "base_model.model."


def check_exportable(learned: LearnedInitialization) -> None:
    cfg = learned.experiment.cfg
    require(cfg.model.name == "hf_encoder", "model", f"export writes Hugging Face formats, for model=hf_encoder runs; "
            f"this run used model={cfg.model.name}")
    require(cfg.peft.name in PEFT_FORMATS, "peft", f"export writes LoRA and AdaLoRA adapters ({list(PEFT_FORMATS)}); "
            f"this run used peft={cfg.peft.name}")


def low_rank_factors(learned: LearnedInitialization) -> dict[str, tuple[mx.array, mx.array, mx.array]]:
    """module name -> (down (in, r), per-rank scale (r,), up (r, out)); the update is scale * down diag(.) up."""
    weights, frozen, peft = learned.meta["weights"], learned.frozen, learned.experiment.cfg.peft
    factors = {}
    if peft.name == "lora":
        for path in paths_holding(weights, "lora_a"):
            layer = get_in(weights, path)
            factors[path_name(path)] = (layer["lora_a"], mx.ones((peft.rank,)), layer["lora_b"])
    else:
        for path in paths_holding(weights, "ada_p"):
            layer, mask = get_in(weights, path), get_in(frozen, path)["ada_mask"]
            factors[path_name(path)] = (layer["ada_p"], layer["ada_lambda"] * mask, layer["ada_q"])
    return factors


def write_head(learned: LearnedInitialization, out: Path) -> None:
    head = learned.meta["weights"]["head"]
    io.save_tree(out / "head.safetensors", {"weight": head["weight"].T, "bias": head["bias"]})


def peft_adapter(learned: LearnedInitialization, out: Path) -> Path:
    """A Hugging Face PEFT adapter directory for the run's meta-learned LoRA / AdaLoRA initialization."""
    cfg = learned.experiment.cfg
    factors = low_rank_factors(learned)
    tensors = {}
    for module, (down, singular, up) in factors.items():
        if cfg.peft.name == "lora":
            tensors[f"{PREFIX}{module}.lora_A.weight"] = down.T
            tensors[f"{PREFIX}{module}.lora_B.weight"] = up.T
        else:
            tensors[f"{PREFIX}{module}.lora_A"] = down.T
            tensors[f"{PREFIX}{module}.lora_E"] = singular[:, None]
            tensors[f"{PREFIX}{module}.lora_B"] = up.T
    common = {"base_model_name_or_path": str(learned.experiment.model.directory), "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "lora_alpha": cfg.peft.alpha,
              "lora_dropout": float(cfg.peft.get("dropout", 0.0)), "modules_to_save": None,
              "target_modules": sorted(factors), "task_type": None, "revision": None}
    if cfg.peft.name == "lora":
        config = {**common, "peft_type": "LORA", "r": cfg.peft.rank, "init_lora_weights": True, "use_rslora": False}
    else:
        steps = cfg.mode.num_iterations  # peft's schedule in its own step counts (see metapeft.peft.adalora)
        config = {**common, "peft_type": "ADALORA", "r": cfg.peft.init_r, "init_r": cfg.peft.init_r,
                  "target_r": cfg.peft.target_r, "beta1": cfg.peft.beta1, "beta2": cfg.peft.beta2,
                  "orth_reg_weight": cfg.peft.orth_reg_weight, "total_step": steps,
                  "tinit": round(cfg.peft.prune_start * steps), "tfinal": round((1 - cfg.peft.prune_end) * steps),
                  "deltaT": 1, "rank_pattern": None}
    out.mkdir(parents=True, exist_ok=True)
    io.save_tree(out / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    io.write_text(out / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    write_head(learned, out)
    return out


def merged_backbone(learned: LearnedInitialization) -> dict:
    """The frozen backbone with each targeted layer's weight replaced by W + scale * down diag(s) up."""
    frozen, factors, s = learned.frozen, low_rank_factors(learned), learned.experiment.peft.scale
    updates: dict = {}
    for path in paths_holding(frozen, "weight"):
        if path_name(path) in factors:
            down, singular, up = factors[path_name(path)]
            set_in(updates, path, {"weight": get_in(frozen, path)["weight"] + s * ((down * singular) @ up)})
    return merge(strip_adapter_state(frozen), updates)


def strip_adapter_state(tree):
    """The tree without PEFT-only entries (AdaLoRA's masks)."""
    if isinstance(tree, dict):
        return {k: strip_adapter_state(v) for k, v in tree.items() if k != "ada_mask"}
    if isinstance(tree, list):
        return [strip_adapter_state(v) for v in tree]
    return tree


def merged_model(learned: LearnedInitialization, out: Path) -> Path:
    """A Hugging Face model directory whose weights carry the meta-learned update (an unadapted task's start)."""
    source = learned.experiment.model.directory
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and item.name != "model.safetensors":
            shutil.copy2(item, out / item.name)
        elif item.is_dir():
            shutil.copytree(item, out / item.name, dirs_exist_ok=True)
    io.save_tree(out / "model.safetensors", to_hf_names(merged_backbone(learned)), metadata={"format": "pt"})
    write_head(learned, out)
    return out


def export(run: str | Path, out: str | Path, merge_weights: bool = False) -> Path:
    from metapeft.api import load_run

    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ConfigError("--out", f"{out} exists and is not empty; give a new directory")
    learned = load_run(run)
    check_exportable(learned)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError("--out", f"cannot create {out} ({error.strerror}); give a directory that can be") from None
    if not merge_weights:
        require("backbone" not in learned.meta, "--merge", "this run meta-learned the backbone too (algorithm."
                f"meta_learn={cfg_meta_learn(learned)}); an adapter alone would be applied to the original base "
                "model: export the whole model with --merge")
    return merged_model(learned, out) if merge_weights else peft_adapter(learned, out)


def cfg_meta_learn(learned: LearnedInitialization) -> str:
    return str(learned.experiment.cfg.algorithm.meta_learn)
