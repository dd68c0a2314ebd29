"""Cross-task transfer, and the similarity-guided choice of an initialization from a library of checkpoints.

A transfer study names regions of one task family's task space, each a set of task keys (sinusoid amplitudes
0.1-2.5 and 2.5-5; digits 0-4 and 5-9). It meta-trains one source run per region, then adapts every source on the
same meta-test tasks of every target region. A cell of the transfer matrix is the gain of the source's
meta-learned initialization over the same model adapted from its plain initialization (the plain_init baseline), paired
task by task: mean and 95% CI, positive = better (for MSE the difference is negated).

Similarity-guided choice: the sources form a library. Each is represented by the mean embedding of some of its
meta-train tasks, each meta-test task (all target regions pooled) by its support set's embedding; the task is
adapted from the most similar source. Reported next to every fixed choice of source on the same tasks.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Dict

import numpy as np
from hydra.core.config_store import ConfigStore
from matplotlib.figure import Figure
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metapeft import io
from metapeft.api import LearnedInitialization, load_run
from metapeft.backend import mx
from metapeft.build import build, initial_state
from metapeft.embeddings import fisher_embedding, similarity_matrix, statistics_embedding
from metapeft.errors import ConfigError, require
from metapeft.evaluate import learner_curves, plain_init_curves, sources_of, task_structure
from metapeft.experiment import run
from metapeft.plots import save
from metapeft.stats import mean_ci95, mean_ci95_record
from metapeft.tasks.base import Episodes, TaskClasses
from metapeft.tasks.classification import ClassImagesTask

log = logging.getLogger("metapeft")


class Embedding(StrEnum):
    statistics = "statistics"  # input and label moments of the support set
    fisher = "fisher"  # Task2Vec's, with the first source as the common probe network


class Similarity(StrEnum):
    cosine = "cosine"
    rbf = "rbf"


@dataclass
class TransferConfig:
    name: str = MISSING
    regions: Dict[str, Any] = MISSING  # region name -> task keys that define it
    embedding: Embedding = Embedding.statistics
    similarity: Similarity = Similarity.cosine
    num_embedding_tasks: int = 20  # meta-train tasks that represent a source in the library


# conf/transfer/*.yaml select this schema; runners/transfer.py imports this module before composing.
ConfigStore.instance().store(group="schema/transfer", name="transfer", node=TransferConfig)


def region_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """One run config per region: the study's config with the region's task keys applied."""
    require(cfg.get("transfer") is not None, "transfer",
            "choose a transfer study, e.g. transfer=sinusoid_amplitude (options: conf/transfer/)")
    study = cfg.transfer
    require(len(study.regions) >= 2, "transfer.regions", f"needs at least two regions, got {list(study.regions)}")
    require(study.num_embedding_tasks >= 1, "transfer.num_embedding_tasks", f"must be >= 1, got "
            f"{study.num_embedding_tasks}")
    configs = {}
    for name, keys in study.regions.items():
        region = copy.deepcopy(cfg)
        for key, value in keys.items():
            try:
                OmegaConf.update(region.task, key, value, merge=True)
            except OmegaConfBaseException as error:
                raise ConfigError(f"transfer.regions.{name}.{key}",
                                  f"not a valid key or value of task={cfg.task.name}: {error}") from error
        configs[name] = region
    return configs


def per_task_metric(curves: np.ndarray, cfg: DictConfig) -> np.ndarray:
    return curves[:, cfg.evaluation.num_inner_steps]


def embed(study: DictConfig, probe: LearnedInitialization, xs: mx.array, ys: mx.array) -> np.ndarray:
    if study.embedding == Embedding.fisher:
        return fisher_embedding(probe.experiment, probe.meta, probe.frozen, xs, ys)
    task = probe.experiment.task
    return statistics_embedding(xs, ys, task.output_dim if isinstance(task, ClassImagesTask) else None)


def transfer_study(cfg: DictConfig, out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    regions = region_configs(cfg)
    experiments = {name: build(region) for name, region in regions.items()}  # every region checked before training
    task = next(iter(experiments.values())).task
    sign = 1.0 if task.higher_is_better else -1.0
    targets = {name: exp.task.sample_with_classes("test", cfg.mode.num_eval_tasks, cfg.shots.train,
                                                  np.random.default_rng([cfg.seed, 3]))
               for name, exp in experiments.items()}

    sources: dict[str, LearnedInitialization] = {}
    scores: dict[tuple[str, str], np.ndarray] = {}  # (source, target) -> per-task metric, meta-learned
    matrix = []
    for source, region in regions.items():
        log.info("transfer: meta-training the %s source", source)
        run(region, out_dir / "sources" / source)
        learned = sources[source] = load_run(out_dir / "sources" / source)
        start = initial_state(learned.experiment)
        steps = cfg.evaluation.curve_steps
        for target, (episodes, drawn) in targets.items():
            classes = sources_of(drawn)
            ours = scores[source, target] = per_task_metric(
                learner_curves(learned.experiment, learned.meta, learned.frozen, episodes, steps), cfg)
            base = per_task_metric(
                plain_init_curves(learned.experiment, start.plain, start.frozen, episodes, steps), cfg)
            gain, gain_ci = mean_ci95(sign * (ours - base), classes)
            matrix.append({"source": source, "target": target, "gain": gain, "gain_ci95": gain_ci,
                           "meta_learned": mean_ci95_record(ours, classes),
                           "plain_init": mean_ci95_record(base, classes), **task_structure(drawn)})
    result = {
        "metric": task.metric_name,
        "higher_is_better": sign > 0,
        "shots": cfg.shots.train,
        "num_tasks": cfg.mode.num_eval_tasks,
        "num_inner_steps": cfg.evaluation.num_inner_steps,
        "baseline": "plain_init",
        "regions": {name: OmegaConf.to_container(keys) for name, keys in cfg.transfer.regions.items()},
        "matrix": matrix,
        "guided_choice": guided_choice(cfg, experiments, sources, targets, scores, sign),
    }
    io.write_json(out_dir / "transfer.json", result)
    plot_transfer(result, list(regions), out_dir / "transfer.png")
    return result


def guided_choice(cfg: DictConfig, experiments: dict, sources: dict[str, LearnedInitialization],
                  targets: dict[str, tuple[Episodes, TaskClasses | None]], scores: dict, sign: float) -> dict:
    """Adapt each meta-test task from the library source nearest to it; compare with every fixed choice."""
    study, names = cfg.transfer, list(sources)
    probe = sources[names[0]]
    rng = np.random.default_rng([cfg.seed, 5])
    library = []
    for name in names:
        tasks = experiments[name].task.sample("train", study.num_embedding_tasks, cfg.shots.train, rng)
        library.append(np.mean([embed(study, probe, tasks.xs[i], tasks.ys[i]) for i in range(len(tasks))], axis=0))
    chosen, guided, truth = [], [], []
    for target, (episodes, _) in targets.items():
        for i in range(len(episodes)):
            similarity = similarity_matrix([embed(study, probe, episodes.xs[i], episodes.ys[i]), *library],
                                           study.similarity)[0, 1:]
            pick = names[int(np.argmax(similarity))]
            chosen.append(pick)
            truth.append(target)
            guided.append(scores[pick, target][i])
    guided = np.array(guided)
    fixed = {name: np.concatenate([scores[name, target] for target in targets]) for name in names}
    per_target = [sources_of(drawn) for _, drawn in targets.values()]
    classes = None if any(c is None for c in per_target) else np.concatenate(per_target)
    return {
        "embedding": study.embedding,
        "similarity": study.similarity,
        "guided": mean_ci95_record(guided, classes),
        "fixed": {name: mean_ci95_record(values, classes) for name, values in fixed.items()},
        "gain_over_fixed": {name: mean_ci95_record(sign * (guided - values), classes)
                            for name, values in fixed.items()},
        "chosen_own_region": float(np.mean([c == t for c, t in zip(chosen, truth)])),
        "choices": {target: {name: int(sum(c == name for c, t in zip(chosen, truth) if t == target))
                             for name in names} for target in targets},
    }


def plot_transfer(result: dict, names: list[str], path: Path) -> None:
    cells = {(c["source"], c["target"]): c for c in result["matrix"]}
    gains = np.array([[cells[s, t]["gain"] for t in names] for s in names])
    limit = max(np.abs(gains).max(), 1e-12)
    fig = Figure(figsize=(2.5 + 1.2 * len(names), 1.8 + 0.9 * len(names)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(gains, cmap="RdBu", vmin=-limit, vmax=limit)
    for i, s in enumerate(names):
        for j, t in enumerate(names):
            ax.text(j, i, f"{cells[s, t]['gain']:+.3f}\n±{cells[s, t]['gain_ci95']:.3f}", ha="center", va="center",
                    fontsize=8, color="white" if abs(gains[i, j]) > 0.6 * limit else "black")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("target (meta-test tasks)")
    ax.set_ylabel("source (meta-trained on)")
    better = "higher" if result["higher_is_better"] else "lower"
    fig.colorbar(image, ax=ax, label=f"gain over plain_init ({result['metric']}, {better} is better)")
    ax.set_title(f"{result['shots']}-shot transfer, {result['num_tasks']} tasks per target", fontsize=9)
    save(fig, path)  # PNG and PDF
