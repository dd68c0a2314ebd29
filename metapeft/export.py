"""Meta-learned adapters in formats other tools load: a Hugging Face PEFT adapter directory, or a merged model.

For a run of a Hugging Face checkpoint (``model=hf_encoder``, ``model=hf_vit``, ``model=causal_lm``: a model with
``hf_state_dict``) whose PEFT method has a Hugging Face peft format (``PeftMethod.hf_peft_type``: LoRA, AdaLoRA,
(IA)^3, DoRA, prefix tuning), ``peft_adapter`` writes the meta-learned initialization as
``adapter_config.json`` + ``adapter_model.safetensors``; the method supplies the tensors under peft's names and
layouts and its entries of the config (``hf_adapter_tensors``, ``hf_adapter_config``). ``merged_model`` writes the
backbone with the update folded in (the method's ``merged``; every method that changes weights or biases, BitFit
included) as a Hugging Face model directory (``model.safetensors``, the source's ``config.json`` and tokenizer
files). The task head, which these encoders have no place for, goes beside either as ``head.safetensors`` (a
``torch.nn.Linear`` state dict: ``weight`` (n_way, hidden), ``bias``); it is the meta-learned head a task's
adaptation starts from. Nothing here names a method: a new one brings its formats with it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from metapeft import io
from metapeft.api import LearnedInitialization
from metapeft.errors import ConfigError, require
from metapeft.peft.base import PeftMethod
from metapeft.registry import PEFT_METHODS

PREFIX = "base_model.model."


def check_exportable(learned: LearnedInitialization, merge_weights: bool) -> None:
    cfg, peft = learned.experiment.cfg, learned.experiment.peft
    require(hasattr(learned.experiment.model, "hf_state_dict"), "model", "export writes Hugging Face formats, for "
            "runs of a Hugging Face checkpoint (model=hf_encoder, model=hf_vit, model=causal_lm); this run used "
            f"model={cfg.model.name}")
    if merge_weights:
        require(merges(type(peft)), "--merge", f"peft={cfg.peft.name} adds no weights that fold into the model; "
                f"methods that do: {methods_that(merges)}"
                + (" (export this run's adapter without --merge)" if exportable(type(peft)) else ""))
    else:
        require(exportable(type(peft)), "peft", f"peft={cfg.peft.name} has no Hugging Face peft format; "
                f"methods that have one: {methods_that(exportable)}"
                + (" (or export the merged model with --merge)" if merges(type(peft)) else ""))


def methods_that(has) -> list[str]:
    return [name for name in PEFT_METHODS.names() if has(PEFT_METHODS.get(name))]


def exportable(method: type[PeftMethod]) -> bool:
    """Whether the method has a Hugging Face peft adapter format."""
    return method.hf_peft_type is not None


def merges(method: type[PeftMethod]) -> bool:
    """Whether the method folds into the backbone's weights (it brings a ``merged``)."""
    return method.merged is not PeftMethod.merged


def write_head(learned: LearnedInitialization, out: Path) -> None:
    """The meta-learned task head beside the adapter or model (a language model has none: its head is lm_head)."""
    head = learned.meta["weights"].get("head")
    if head is None:
        return
    io.save_tree(out / "head.safetensors", {"weight": head["weight"].T, "bias": head["bias"]})


def peft_adapter(learned: LearnedInitialization, out: Path) -> Path:
    """A Hugging Face PEFT adapter directory for the run's meta-learned initialization."""
    exp, weights = learned.experiment, learned.meta["weights"]
    # module names as the installed transformers names them (they can differ from the checkpoint's: ViT in
    # transformers 5); the renaming rules apply to whole weight names, as transformers applies them
    rename = getattr(exp.model, "hf_module_name", lambda name: name)
    tensors = {(PREFIX + rename(key.removeprefix(PREFIX)) if key.startswith(PREFIX) else key): value
               for key, value in exp.peft.hf_adapter_tensors(weights, learned.frozen, PREFIX).items()}
    config = {"base_model_name_or_path": str(exp.model.directory), "inference_mode": True, "task_type": None,
              "revision": None, "peft_type": exp.peft.hf_peft_type,
              **exp.peft.hf_adapter_config(weights, exp.cfg.mode.num_iterations)}
    for key in ("target_modules", "feedforward_modules"):
        if config.get(key):
            config[key] = sorted(rename(module) for module in config[key])
    if "fan_in_fan_out" in config:  # GPT-2's Conv1D layers store (in, out)
        config["fan_in_fan_out"] = bool(getattr(exp.model, "hf_fan_in_fan_out", False))
    out.mkdir(parents=True, exist_ok=True)
    io.save_tree(out / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    io.write_text(out / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    write_head(learned, out)
    return out


def merged_backbone(learned: LearnedInitialization) -> dict:
    """The (meta-learned, where it was) backbone with the adapter folded in by its PEFT method."""
    return learned.experiment.peft.merged(learned.meta["weights"], learned.frozen)


def merged_model(learned: LearnedInitialization, out: Path) -> Path:
    """A Hugging Face model directory whose weights carry the meta-learned update (an unadapted task's start)."""
    source = learned.experiment.model.directory
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():  # the weights (one file, or shards and their index) are written anew
        if item.is_file() and not (item.suffix == ".safetensors" or item.name == "model.safetensors.index.json"):
            shutil.copy2(item, out / item.name)
        elif item.is_dir():
            shutil.copytree(item, out / item.name, dirs_exist_ok=True)
    state = learned.experiment.model.hf_state_dict(merged_backbone(learned))
    io.save_tree(out / "model.safetensors", state, metadata={"format": "pt"})
    write_head(learned, out)
    return out


def export(run: str | Path, out: str | Path, merge_weights: bool = False) -> Path:
    from metapeft.api import load_run

    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ConfigError("--out", f"{out} exists and is not empty; give a new directory")
    learned = load_run(run)
    check_exportable(learned, merge_weights)
    if not merge_weights:  # every refusal before the folder is made: a refused export leaves nothing behind
        require("backbone" not in learned.meta, "--merge", "this run meta-learned the backbone too (algorithm."
                f"meta_learn={cfg_meta_learn(learned)}); an adapter alone would be applied to the original base "
                "model: export the whole model with --merge")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError("--out", f"cannot create {out} ({error.strerror}); give a directory that can be") from None
    return merged_model(learned, out) if merge_weights else peft_adapter(learned, out)


def cfg_meta_learn(learned: LearnedInitialization) -> str:
    return str(learned.experiment.cfg.algorithm.meta_learn)
