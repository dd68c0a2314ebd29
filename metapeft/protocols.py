"""Whose experimental protocol a run follows where a paper and this project differ (``task.protocol``).

A protocol sets defaults in other groups' schemas (the model's initialization, Meta-SGD's rates), which any
override still replaces: such a default is ``protocol_default(SETTING)``, an interpolation that reads
``task.protocol`` (``project`` where the task has none). Importing this module registers its resolver, so the
schemas work standalone too.
"""
from __future__ import annotations

from enum import StrEnum

from omegaconf import OmegaConf

from metapeft.errors import require


class Protocol(StrEnum):
    project = "project"
    maml_paper = "maml_paper"  # MAML's reference code, as the Meta-SGD paper's Table 1 used it


SETTINGS = {
    "model_init": {Protocol.project: "pytorch", Protocol.maml_paper: "maml_reference"},
    "metasgd_init_lr_range": {Protocol.project: None, Protocol.maml_paper: [0.005, 0.1]},
}


def setting(name: str, protocol: str):
    require(protocol in Protocol.__members__, "task.protocol",
            f"unknown protocol '{protocol}'; valid: {', '.join(Protocol.__members__)}")
    return SETTINGS[name][Protocol(protocol)]


def protocol_default(name: str) -> str:
    """The interpolation a schema uses as the default of a setting that follows the task's protocol."""
    return f"${{protocol:{name},${{oc.select:task.protocol,project}}}}"


if not OmegaConf.has_resolver("protocol"):
    OmegaConf.register_new_resolver("protocol", setting)
