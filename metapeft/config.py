"""Structured-config schemas for the groups every run shares, and registration of all group schemas.

Group schemas of a single implementation (an algorithm, a task, ...) live next to that implementation and are
registered by ``metapeft.registry``. A mistyped key or a wrong type fails at composition and names the key.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from metapeft.errors import require
from metapeft.finetune import FinetuneConfig
from metapeft.probes import ProbeConfig
from metapeft.registry import ALGORITHMS, MODELS, PEFT_METHODS, TASKS, import_submodules, load_plugins

GROUPS = ("algorithm", "peft", "shots", "mode", "task", "model")  # the config groups every run chooses from
GROUP_HELP = {  # what ``--help`` lists (the schema/* groups are internal, transfer is runners/transfer.py's)
    "algorithm": "how the initialization is meta-learned",
    "peft": "what is adapted per task: the whole model (none) or an adapter over a frozen pretrained backbone",
    "model": "the backbone",
    "task": "the few-shot task family",
    "shots": "support examples per class (or per task) in meta-training; shots.eval: the K tested",
    "mode": "the budget: quick (1,000 meta-iterations), full (70,000), tiny (a smoke test)",
    "experiment": "named sweeps",
    "paths": "where runs, sweeps, benchmarks and caches go (paths.output_dir, paths.multirun_dir, paths.cache_dir)",
    "logger": "where a finished run is also sent, a list: logger=[csv,mlflow] (csv: the run's own files)",
}
CONF_DIR = Path(__file__).resolve().parent / "conf"  # shipped in the package (conf/ at the top links here)


def group_options(group: str) -> list[str]:
    """A group's options, read from conf/<group>/ (1shot, 5shot, 10shot, 20shot in numeric order)."""
    stems = [p.stem for p in (CONF_DIR / group).glob("*.yaml")]
    return sorted(stems, key=lambda stem: (int(digits) if (digits := stem.removesuffix("shot")).isdigit() else 0, stem))


def invoked_as(tool: str = "run") -> str:
    """How to start one of metapeft's commands, as the runner itself was started (for ``--help``): the installed
    ``metapeft-<tool>``, or ``python runners/<tool>.py`` from a checkout."""
    import sys

    program = Path(sys.argv[0])
    if program.name.startswith("metapeft-"):
        return f"metapeft-{tool.replace('_', '-')}"
    return f"python runners/{tool}.py"


def groups_help() -> str:
    """``--help``'s list of groups: options read from conf/<group>/, one line each with what the group chooses."""
    return "\n".join(f"  {group}: {', '.join(group_options(group))}\n      {description}"
                     for group, description in GROUP_HELP.items())


@dataclass
class ShotsConfig:
    name: str = MISSING
    train: int = MISSING  # support examples per class (classification) or per task (regression)
    eval: List[int] = field(default_factory=lambda: [1, 5, 10])


@dataclass
class ModeConfig:
    name: str = MISSING
    num_iterations: int = MISSING
    val_interval: int = MISSING
    num_val_tasks: int = MISSING
    num_eval_tasks: int = MISSING
    pretrain_iterations: int = MISSING  # the most a backbone is pretrained (it stops early once validation stalls)
    finetune_steps: List[int] = MISSING  # the step counts the finetune baselines choose from on validation
    # The baselines' other budgets. A default here is what a run saved before the key existed did.
    finetune_learning_rates: List[float] = field(default_factory=lambda: [0.001, 0.003, 0.01, 0.03])
    baseline_val_tasks: int = "${mode.num_val_tasks}"  # type: ignore[assignment]  # tuned baselines choose on these
    # false: the budgets above are cut for speed (quick, tiny), and every run says which baselines that touched
    baselines_at_full_strength: bool = True
    # left out for their cost when ``baselines`` is null (every run says so); ``baselines=[...]`` runs what it names
    skipped_baselines: List[str] = field(default_factory=list)


@dataclass
class EvaluationConfig:
    # The reported metric is read after num_inner_steps (default: the algorithm's training budget), for the
    # meta-learned model and the baseline alike; the adaptation curve continues to curve_steps.
    num_inner_steps: int = "${algorithm.num_inner_steps}"  # type: ignore[assignment]
    curve_steps: int = 10
    chunk_size: int = 200  # evaluation tasks adapted at once (bounds memory)
    # also score the meta-learned start fine-tuned with Adam as the finetune baseline is (metapeft.finetune)
    finetune_meta_learned: bool = False


@dataclass
class PretrainConfig:
    """Pretraining of the backbone the PEFT methods adapt (see ``metapeft.pretrain``): until the features stop
    improving on meta-validation tasks, at most ``iterations``."""

    iterations: int = "${mode.pretrain_iterations}"  # type: ignore[assignment]
    val_interval: int = 250  # iterations between validations
    patience: int = 8  # validations without improvement before stopping
    num_val_tasks: int = 100  # meta-validation tasks the features are scored on
    val_shots: int = "${shots.train}"  # type: ignore[assignment]  # support examples per class (or task) there
    batch_size: int = 128
    lr: float = 0.001  # Adam
    # the backbone's seed: by default the run's, so that a sweep over seeds includes pretraining's variance; a
    # fixed value holds one backbone for every seed (the meta-training run's variance alone)
    seed: int = "${seed}"  # type: ignore[assignment]
    cache_dir: str = "${oc.select:paths.cache_dir,'~/.cache/metapeft'}"


class Device(StrEnum):
    """Where MLX computes (``metapeft.backend.use_device``)."""

    auto = "auto"  # the GPU where MLX has one (Metal on Apple silicon, CUDA with .[cuda]), else the CPU
    cpu = "cpu"
    gpu = "gpu"


class Keep(StrEnum):
    """The meta-parameters a run evaluates and saves."""

    last = "last"
    best_val = "best_val"  # those with the best validation metric seen (early stopping's choice)


# Keys that do not change what a job computes: ignored when deciding whether a stored result is this job's
# (``metapeft.sweep``), and left out of a sweep job's directory name together with ``experiment`` (whose own
# settings a name could not show anyway).
NON_IDENTIFYING_KEYS = ("resume", "progress", "pretrain.cache_dir", "task.cache_dir", "model.cache_dir", "logger",
                        "paths")


@dataclass
class PathsConfig:
    """Where everything is read and written (``paths=default``; add ``conf/paths/<site>.yaml`` for a cluster).
    Relative paths are relative to where the command runs."""

    name: str = "default"
    output_dir: str = "outputs"  # single runs (outputs/<date>/<time>), benchmarks/ and validation/
    multirun_dir: str = "multirun"  # sweeps (multirun/<date>/<time>/<job>)
    cache_dir: str = "${oc.env:METAPEFT_CACHE_DIR,'~/.cache/metapeft'}"  # pretrained backbones, the glyph benchmark


@dataclass
class RunConfig:
    algorithm: Any = MISSING
    peft: Any = MISSING
    shots: ShotsConfig = MISSING
    mode: ModeConfig = MISSING
    task: Any = MISSING
    model: Any = MISSING
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    seed: int = 0
    device: Device = Device.auto
    progress: bool = True  # tqdm progress bars
    resume: bool = False  # in a sweep: skip jobs whose directory holds a completed result for the same overrides
    train: bool = True  # false (with checkpoint=<run dir>): evaluate a saved run instead of meta-training
    checkpoint: Optional[str] = None  # a run directory or its checkpoint/ folder
    keep: Keep = Keep.last
    patience: Optional[int] = None  # with keep=best_val: stop after this many validations without improvement
    baselines: Optional[List[str]] = None  # evaluated next to the meta-learned model; null: all that apply
    transfer: Any = None  # a transfer study (runners/transfer.py, which registers its schema)
    paths: PathsConfig = field(default_factory=PathsConfig)
    logger: Dict[str, Any] = field(default_factory=dict)  # logger=[csv,tensorboard,mlflow,wandb]: name -> settings


def identifies(key: str) -> bool:
    """Whether an override of ``key`` changes what a job computes (``paths.cache_dir`` does not: it is under
    ``paths``)."""
    key = key.lstrip("+~")
    return not any(key == k or key.startswith(f"{k}.") for k in NON_IDENTIFYING_KEYS)


def job_dirname(overrides: str, limit: int = 200) -> str:
    """A sweep job's directory name: its overrides, or, when they are longer than ``limit`` bytes (file systems
    refuse names over 255), their first bytes and a hash of all of them, so the name stays unique and stable
    (``resume=true`` finds the job again)."""
    raw = overrides.encode()
    if len(raw) <= limit:
        return overrides
    return raw[: limit - 17].decode(errors="ignore") + "-" + hashlib.sha256(raw).hexdigest()[:16]


def optimization_direction(task_name: str) -> str:
    """How a sweeper treats a task's validation metric, from the task family itself (not restated in YAML)."""
    return "maximize" if TASKS.get(task_name).higher_is_better else "minimize"


def register_configs() -> None:
    """Populate Hydra's ConfigStore with every schema and register the resolvers the YAML files use. Call before
    composing a config; importing the implementations loads no MLX (``metapeft.backend``)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="schema/shots", name="shots", node=ShotsConfig)
    cs.store(group="schema/mode", name="mode", node=ModeConfig)
    cs.store(group="schema/paths", name="paths", node=PathsConfig)
    for package in ("metapeft.algorithms", "metapeft.tasks", "metapeft.models", "metapeft.peft", "metapeft.loggers"):
        import_submodules(package)
    load_plugins()
    # ${by_mode:${mode.name},QUICK,FULL}: a value that depends on the mode, e.g. the number of search trials.
    OmegaConf.register_new_resolver("by_mode", lambda mode, quick, full: quick if mode == "quick" else full,
                                    replace=True)
    OmegaConf.register_new_resolver("direction", optimization_direction, replace=True)
    OmegaConf.register_new_resolver("groups_help", groups_help, replace=True)
    OmegaConf.register_new_resolver("command", lambda tool="run": invoked_as(tool), replace=True)
    OmegaConf.register_new_resolver("job_dirname", job_dirname, replace=True)
    # Hydra's exclude_keys match whole keys: paths.multirun_dir=/x/y is excluded by name, not as part of paths
    OmegaConf.register_new_resolver("job_dirname_excluded_keys", lambda: [
        *NON_IDENTIFYING_KEYS, *(f"paths.{f.name}" for f in fields(PathsConfig)), "experiment"], replace=True)


def check_known_keys(cfg: Any) -> None:
    """Refuse keys no schema knows: Hydra's ``+key=value`` adds them to any node, and a typo such as
    ``+peft.rnak=4`` would otherwise run to completion and do nothing."""
    unknown = sorted(set(cfg) - set(OmegaConf.structured(RunConfig)))
    require(not unknown, unknown[0] if unknown else "", "is not a key of the run config (was it added with '+'?); "
            f"valid top-level keys: {sorted(OmegaConf.structured(RunConfig))}")
    for group, registry in (("algorithm", ALGORITHMS), ("task", TASKS), ("model", MODELS), ("peft", PEFT_METHODS)):
        known = set(OmegaConf.structured(registry.schema(cfg[group].name)))
        unknown = sorted(set(cfg[group]) - known)
        require(not unknown, f"{group}.{unknown[0]}" if unknown else group, f"is not a key of {group}="
                f"{cfg[group].name} (was it added with '+'?); valid: {sorted(known)}")


def validate_common(cfg: Any) -> None:
    """Checks of the shared groups; each implementation checks its own keys when it is built."""
    check_known_keys(cfg)
    require(cfg.get("seed") is not None, "seed", "must be set (a non-negative integer); was it deleted with '~seed'?")
    require(cfg.shots.train > 0, "shots.train", f"must be a positive integer, got {cfg.shots.train}")
    require(len(cfg.shots.eval) > 0, "shots.eval", "must list at least one K to evaluate, e.g. [1, 5, 10]")
    for k in cfg.shots.eval:
        require(k > 0, "shots.eval", f"every K must be a positive integer, got {list(cfg.shots.eval)}")
    require(len(set(cfg.shots.eval)) == len(cfg.shots.eval), "shots.eval",
            f"lists a K twice (each is evaluated once, keyed by K), got {list(cfg.shots.eval)}")
    require(cfg.mode.num_iterations > 0, "mode.num_iterations", f"must be > 0, got {cfg.mode.num_iterations}")
    require(cfg.mode.val_interval > 0, "mode.val_interval", f"must be > 0, got {cfg.mode.val_interval}")
    require(cfg.mode.num_val_tasks > 1, "mode.num_val_tasks", f"must be > 1, got {cfg.mode.num_val_tasks}")
    require(cfg.mode.num_eval_tasks > 1, "mode.num_eval_tasks",
            f"must be > 1 (a confidence interval needs two tasks), got {cfg.mode.num_eval_tasks}")
    require(0 <= cfg.seed < 2**63, "seed", f"must be an integer in 0..2**63-1, got {cfg.seed}")
    # checked here, before evaluation.num_inner_steps (which defaults to it), so that the key the user set is named
    require(cfg.algorithm.num_inner_steps >= 0, "algorithm.num_inner_steps",
            f"must be >= 0, got {cfg.algorithm.num_inner_steps}")
    require(cfg.evaluation.num_inner_steps >= 0, "evaluation.num_inner_steps",
            f"must be >= 0, got {cfg.evaluation.num_inner_steps}")
    require(cfg.evaluation.curve_steps >= cfg.evaluation.num_inner_steps, "evaluation.curve_steps",
            f"must be >= evaluation.num_inner_steps={cfg.evaluation.num_inner_steps}, got {cfg.evaluation.curve_steps}")
    for key in ("iterations", "batch_size", "val_interval", "patience", "num_val_tasks", "val_shots"):
        require(cfg.pretrain[key] >= 1, f"pretrain.{key}", f"must be >= 1, got {cfg.pretrain[key]}")
    require(cfg.pretrain.lr > 0, "pretrain.lr", f"must be > 0, got {cfg.pretrain.lr}")
    require(cfg.train or cfg.checkpoint is not None, "checkpoint",
            "train=false evaluates a saved run: give checkpoint=<run dir>/checkpoint")
    require(not (cfg.train and cfg.checkpoint is not None), "train",
            "a finished run's checkpoint is evaluated with train=false; an interrupted run goes on with "
            "resume=true hydra.run.dir=<its run directory>")
    if cfg.patience is not None:
        require(cfg.patience >= 1, "patience",
                f"must be >= 1 validations (or null: never stop early), got {cfg.patience}")
        require(cfg.keep == Keep.best_val, "patience",
                "early stopping keeps the best validated parameters: add keep=best_val")
    require(len(cfg.mode.finetune_steps) > 0 and min(cfg.mode.finetune_steps) >= 1, "mode.finetune_steps",
            f"must list step counts >= 1, got {list(cfg.mode.finetune_steps)}")
    rates_key = "finetune.learning_rates" if OmegaConf.is_interpolation(cfg.finetune, "learning_rates") is False \
        else "mode.finetune_learning_rates"  # the key the value came from
    require(len(cfg.finetune.learning_rates) > 0 and min(cfg.finetune.learning_rates) > 0,
            rates_key, f"must list rates > 0, got {list(cfg.finetune.learning_rates)}")
    require(cfg.mode.baseline_val_tasks >= 1, "mode.baseline_val_tasks",
            f"must be >= 1 (the tuned baselines choose their settings on these tasks), got "
            f"{cfg.mode.baseline_val_tasks}")
    for key in ("logistic_c", "ridge_alpha"):
        require(len(cfg.probe[key]) > 0 and min(cfg.probe[key]) > 0, f"probe.{key}",
                f"must list values > 0, got {list(cfg.probe[key])}")
    require(cfg.evaluation.chunk_size > 0, "evaluation.chunk_size", f"must be > 0, got {cfg.evaluation.chunk_size}")
