"""MLX, imported at its first use, after the BLAS it should call is loaded.

The Linux ``mlx[cpu]`` wheel binds its matrix products when ``mlx.core`` is loaded, so an optimized BLAS must be
loaded before it (``metapeft.blas``). metapeft's modules therefore never import MLX themselves: they take ``mx``
(``mlx.core``), ``optim`` (``mlx.optimizers``) and ``utils`` (``mlx.utils``) from here. These are stand-ins that
call ``load()`` at their first attribute access and from then on hold the real module's attributes, so
``import metapeft.<anything>``, ``runners/run.py --help`` and ``--cfg`` load neither MLX nor a BLAS, and no import
order needs remembering.

``load()`` also starts MLX's CPU stream thread and notes which thread it is (``metapeft.affinity``).
Code that imports ``mlx.core`` itself before metapeft's first MLX use keeps MLX's bundled BLAS (``blas.status()``
says so).
"""
from __future__ import annotations

import importlib
import sys
import types

from metapeft import affinity, blas
from metapeft.errors import require


class DeferredModule(types.ModuleType):
    """A module object that becomes ``name`` at its first attribute access."""

    def __getattr__(self, attribute: str):  # only reached while the real attributes are not yet here
        load()
        return getattr(sys.modules[self.__name__], attribute)


mx = DeferredModule("mlx.core")
optim = DeferredModule("mlx.optimizers")
utils = DeferredModule("mlx.utils")  # tree_map, tree_flatten, tree_unflatten
_loaded = False


def load() -> None:
    """Load the BLAS, then MLX, and record MLX's stream thread; later calls do nothing."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    blas.configure()
    for stand_in in (mx, optim, utils):
        stand_in.__dict__.update(importlib.import_module(stand_in.__name__).__dict__)
    affinity.record_mlx_threads(mx)


def use_device(requested: str) -> str:
    """Make ``requested`` (``auto``, ``cpu`` or ``gpu``) MLX's default device and return the one used: ``auto`` is
    the GPU where this MLX build has one, else the CPU; ``gpu`` without one is refused, naming the key."""
    load()
    has_gpu = mx.is_available(mx.gpu)
    require(requested != "gpu" or has_gpu, "device", "gpu: this MLX build has no GPU backend here (Linux: "
            "pip install -e '.[cuda]', see docs/performance.md, The GPU; Apple silicon: Metal); valid: auto, cpu")
    device = "gpu" if has_gpu and requested != "cpu" else "cpu"
    mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
    return device
