"""Cross-task transfer, and the similarity-guided choice of an initialization from a library of checkpoints.

A transfer study names regions of one task family's task space, each a set of task keys (sinusoid amplitudes
0.1-2.5 and 2.5-5; digits 0-4 and 5-9). It meta-trains one source run per region, then adapts every source on the
same meta-test tasks of every target region. A cell of the transfer matrix is the gain of the source's
meta-learned initialization over the same model adapted from its plain initialization (the scratch baseline), paired
task by task: mean and 95% CI, positive = better (for MSE the difference is negated).

Similarity-guided choice: the sources form a library. Each is represented by the mean embedding of some of its
meta-train tasks, each meta-test task (all target regions pooled) by its support set's embedding; the task is
adapted from the most similar source. Reported next to every fixed choice of source on the same tasks.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import MISSING, DictConfig, OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from metapeft import io  # noqa: E402
from metapeft.api import LearnedInitialization, load_run  # noqa: E402
from metapeft.config import require  # noqa: E402
from metapeft.embeddings import MEASURES, fisher_embedding, similarity_matrix, statistics_embedding  # noqa: E402
from metapeft.errors import ConfigError  # noqa: E402
from metapeft.experiment import build, initial_state, meta_learned_curves, run, scratch_curves  # noqa: E402
from metapeft.stats import mean_ci95, mean_ci95_record  # noqa: E402
from metapeft.tasks.base import Episodes  # noqa: E402
from metapeft.tasks.classification import ClassImagesTask  # noqa: E402

log = logging.getLogger("metapeft")
EMBEDDINGS = ("statistics", "fisher")


@dataclass
class TransferConfig:
    name: str = MISSING
    regions: Dict[str, Any] = MISSING  # region name -> task keys that define it
    embedding: str = "statistics"  # or "fisher": Task2Vec's, with the first source as the common probe network
    similarity: str = "cosine"  # or "rbf"
    num_embedding_tasks: int = 20  # meta-train tasks that represent a source in the library


def region_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """One run config per region: the study's config with the region's task keys applied."""
    require(cfg.get("transfer") is not None, "transfer",
            "choose a transfer study, e.g. transfer=sinusoid_amplitude (options: conf/transfer/)")
    study = cfg.transfer
    require(len(study.regions) >= 2, "transfer.regions", f"needs at least two regions, got {list(study.regions)}")
    require(study.embedding in EMBEDDINGS, "transfer.embedding", f"valid: {list(EMBEDDINGS)}, got {study.embedding}")
    require(study.similarity in MEASURES, "transfer.similarity", f"valid: {list(MEASURES)}, got {study.similarity}")
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
    if study.embedding == "fisher":
        return fisher_embedding(probe.experiment, probe.meta, probe.frozen, xs, ys)
    task = probe.experiment.task
    return statistics_embedding(xs, ys, task.output_dim if isinstance(task, ClassImagesTask) else None)


def transfer_study(cfg: DictConfig, out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    regions = region_configs(cfg)
    experiments = {name: build(region) for name, region in regions.items()}  # every region checked before training
    task = next(iter(experiments.values())).task
    sign = 1.0 if task.higher_is_better else -1.0
    targets = {name: exp.task.sample("test", cfg.mode.num_eval_tasks, cfg.shots.train,
                                     np.random.default_rng([cfg.seed, 3]))
               for name, exp in experiments.items()}

    sources: dict[str, LearnedInitialization] = {}
    scores: dict[tuple[str, str], np.ndarray] = {}  # (source, target) -> per-task metric, meta-learned
    matrix = []
    for source, region in regions.items():
        log.info("transfer: meta-training the %s source", source)
        run(region, out_dir / "sources" / source)
        learned = sources[source] = load_run(out_dir / "sources" / source)
        _, frozen_init, _, scratch, _, _ = initial_state(learned.experiment)
        steps = cfg.evaluation.curve_steps
        for target, episodes in targets.items():
            ours = scores[source, target] = per_task_metric(
                meta_learned_curves(learned.experiment, learned.meta, learned.frozen, episodes, steps), cfg)
            base = per_task_metric(scratch_curves(learned.experiment, scratch, frozen_init, episodes, steps), cfg)
            gain, gain_ci = mean_ci95(sign * (ours - base))
            matrix.append({"source": source, "target": target, "gain": gain, "gain_ci95": gain_ci,
                           "meta_learned": mean_ci95_record(ours),
                           "scratch": mean_ci95_record(base)})
    result = {
        "metric": task.metric_name,
        "higher_is_better": sign > 0,
        "shots": cfg.shots.train,
        "num_tasks": cfg.mode.num_eval_tasks,
        "num_inner_steps": cfg.evaluation.num_inner_steps,
        "baseline": "scratch",
        "regions": {name: OmegaConf.to_container(keys) for name, keys in cfg.transfer.regions.items()},
        "matrix": matrix,
        "guided_choice": guided_choice(cfg, experiments, sources, targets, scores, sign),
    }
    io.write_json(out_dir / "transfer.json", result)
    plot_transfer(result, list(regions), out_dir / "transfer.png")
    return result


def guided_choice(cfg: DictConfig, experiments: dict, sources: dict[str, LearnedInitialization],
                  targets: dict[str, Episodes], scores: dict, sign: float) -> dict:
    """Adapt each meta-test task from the library source nearest to it; compare with every fixed choice."""
    study, names = cfg.transfer, list(sources)
    probe = sources[names[0]]
    rng = np.random.default_rng([cfg.seed, 5])
    library = []
    for name in names:
        tasks = experiments[name].task.sample("train", study.num_embedding_tasks, cfg.shots.train, rng)
        library.append(np.mean([embed(study, probe, tasks.xs[i], tasks.ys[i]) for i in range(len(tasks))], axis=0))
    chosen, guided, truth = [], [], []
    for target, episodes in targets.items():
        for i in range(len(episodes)):
            similarity = similarity_matrix([embed(study, probe, episodes.xs[i], episodes.ys[i]), *library],
                                           study.similarity)[0, 1:]
            pick = names[int(np.argmax(similarity))]
            chosen.append(pick)
            truth.append(target)
            guided.append(scores[pick, target][i])
    guided = np.array(guided)
    fixed = {name: np.concatenate([scores[name, target] for target in targets]) for name in names}
    return {
        "embedding": study.embedding,
        "similarity": study.similarity,
        "guided": mean_ci95_record(guided),
        "fixed": {name: mean_ci95_record(values) for name, values in fixed.items()},
        "gain_over_fixed": {name: mean_ci95_record(sign * (guided - values))
                            for name, values in fixed.items()},
        "chosen_own_region": float(np.mean([c == t for c, t in zip(chosen, truth)])),
        "choices": {target: {name: int(sum(c == name for c, t in zip(chosen, truth) if t == target))
                             for name in names} for target in targets},
    }


def plot_transfer(result: dict, names: list[str], path: Path) -> None:
    cells = {(c["source"], c["target"]): c for c in result["matrix"]}
    gains = np.array([[cells[s, t]["gain"] for t in names] for s in names])
    limit = max(np.abs(gains).max(), 1e-12)
    fig, ax = plt.subplots(figsize=(2.5 + 1.2 * len(names), 1.8 + 0.9 * len(names)))
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
    fig.colorbar(image, ax=ax, label=f"gain over scratch ({result['metric']}, {better} is better)")
    ax.set_title(f"{result['shots']}-shot transfer, {result['num_tasks']} tasks per target", fontsize=9)
    fig.tight_layout()
    io.save_figure(fig, path)
    plt.close(fig)
