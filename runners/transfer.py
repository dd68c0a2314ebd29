"""Cross-task transfer: ``python runners/transfer.py [transfer=sinusoid_amplitude|digits_by_digit] [key=value ...]``.

Meta-trains one source per region of the task space, adapts every source on every target region's meta-test tasks
and writes ``transfer.json`` (the source x target matrix of gains over the plain_init baseline with 95% CIs, and the
similarity-guided choice of initialization against every fixed choice), ``transfer.png`` and each source's run
directory under ``sources/``. Any other override (algorithm, shots, mode, seed, ...) applies to every source.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from metapeft import affinity, backend
from metapeft.config import register_configs
from metapeft.errors import ConfigError
from metapeft.transfer import transfer_study  # registers the transfer schema

log = logging.getLogger("metapeft")
register_configs()


def table(result: dict) -> str:
    lines = [f"{'source -> target':<34} {'meta-learned':>17} {'plain_init':>17} {'gain':>17}"]
    for c in result["matrix"]:
        lines.append(f"{c['source'] + ' -> ' + c['target']:<34} "
                     f"{c['meta_learned']['mean']:>9.4f} ± {c['meta_learned']['ci95']:.4f} "
                     f"{c['plain_init']['mean']:>9.4f} ± {c['plain_init']['ci95']:.4f} "
                     f"{c['gain']:>+9.4f} ± {c['gain_ci95']:.4f}")
    guided = result["guided_choice"]
    lines.append(f"similarity-guided choice ({guided['embedding']} embedding, {guided['similarity']}): "
                 f"{guided['guided']['mean']:.4f} ± {guided['guided']['ci95']:.4f}; own region chosen for "
                 f"{100 * guided['chosen_own_region']:.0f}% of tasks")
    for name, fixed in guided["fixed"].items():
        gain = guided["gain_over_fixed"][name]
        lines.append(f"  fixed {name:<26} {fixed['mean']:.4f} ± {fixed['ci95']:.4f}; guided gain "
                     f"{gain['mean']:+.4f} ± {gain['ci95']:.4f}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="transfer_study")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    backend.load()
    affinity.colocate()  # one process, runs one after another: as a single run of runners/run.py
    try:
        result = transfer_study(cfg, out_dir)
    except ConfigError as error:
        log.error("invalid configuration: %s", error)
        sys.exit(2)
    log.info("%s-shot %s after %d inner steps, %d tasks per target (gain: better than plain_init when positive)\n%s",
             result["shots"], result["metric"], result["num_inner_steps"], result["num_tasks"], table(result))
    log.info("outputs in %s", out_dir)


if __name__ == "__main__":
    main()
