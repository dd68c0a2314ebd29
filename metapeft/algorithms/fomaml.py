"""First-order MAML (Finn et al., 2017, section 5.2): MAML with the second-order terms dropped.

The inner gradients are treated as constants, so d phi / d theta = I and the meta-gradient is the query-loss
gradient at the adapted parameters, applied to the initialization.
"""
from __future__ import annotations

from dataclasses import dataclass

from metapeft.algorithms.base import AlgorithmConfig
from metapeft.algorithms.maml import MAML
from metapeft.registry import ALGORITHMS


@dataclass
class FOMAMLConfig(AlgorithmConfig):
    name: str = "fomaml"


@ALGORITHMS.register("fomaml", FOMAMLConfig)
class FOMAML(MAML):
    first_order = True
