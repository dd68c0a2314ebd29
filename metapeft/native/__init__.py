"""metapeft's vectorized CPU kernels for the transformers' element-wise work (layer norm, softmax, GELU).

MLX 0.32's own CPU kernels on x86-64 are scalar and run on one thread, which puts a MiniLM meta-step's layer norm,
softmax and GELU at 3 to 25 times PyTorch's time (docs/performance.md, "What remains"). ``kernels.cpp`` defines
them as MLX primitives in C++, in loops the compiler vectorizes, with rows split over threads. It is compiled on
first use, like the BLAS shim (``metapeft/blas.py``), into ``$METAPEFT_CACHE_DIR/native`` (default
``~/.cache/metapeft/native``), against the installed MLX's headers and nanobind (a dependency), with
``-march=native``: the file's name carries a digest of the source, the versions, the compiler and this CPU's
flags, so a cache shared between machines never loads another machine's build. Building took 18 to 19 s here, once.

``module()`` is the built extension, or None where it cannot be built or loaded (no C++ compiler, another
platform, an MLX built with an incompatible nanobind); ``status()`` says which and why, and runs record it.
``metapeft.models.native_ops`` makes the kernels differentiable and vmappable; ``model.kernels`` chooses them.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Optional

from metapeft import machine

MODULE_NAME = "_metapeft_kernels"
SOURCE = Path(__file__).with_name("kernels.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-trapping-math", "-fno-math-errno", "-std=c++20",
         "-shared", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing", "-DNDEBUG", "-DNB_DOMAIN=mlx"]
# -fno-trapping-math lets the compiler vectorize loops with a select (softmax's exp, GELU's slope); the kernels
# never read floating-point exception flags. NB_DOMAIN=mlx shares nanobind's type registry with mlx.core, so that
# the extension takes and returns MLX's own arrays.

_module: Optional[ModuleType] = None
NOT_LOADED = "not loaded: no model has asked for them"
_status: dict = {"available": False, "reason": NOT_LOADED}
_threads: Optional[int] = None


def status() -> dict:
    return dict(_status)


def _cache_dir() -> Path:
    return Path(os.environ.get("METAPEFT_CACHE_DIR", "~/.cache/metapeft")).expanduser() / "native"


def _cpu_flags() -> str:
    return machine.cpuinfo_field("flags") or platform.processor()


def _mlx_dir() -> Path:
    from metapeft.backend import mx

    return Path(mx.__file__).parent  # mlx.core's extension lies in the mlx package's folder


def _build(compiler: str, target: Path) -> None:
    import nanobind

    mlx_dir = _mlx_dir()
    command = [compiler, *FLAGS, f"-I{mlx_dir / 'include'}", f"-I{nanobind.include_dir()}",
               f"-I{Path(nanobind.source_dir()).parent / 'ext' / 'robin_map' / 'include'}",
               f"-I{sysconfig.get_paths()['include']}", str(SOURCE),
               str(Path(nanobind.source_dir()) / "nb_combined.cpp"), f"-L{mlx_dir / 'lib'}", "-lmlx",
               f"-Wl,-rpath,{mlx_dir / 'lib'}"]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([*command, "-o", str(built)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)  # atomic: concurrent processes see the finished file or build their own


def _built_path() -> Path:
    import nanobind

    from metapeft.backend import mx

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++ or g++)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = "\n".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_flags(), str(_mlx_dir()),
                     mx.__version__, nanobind.__version__, sys.version])
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    target = _cache_dir() / f"{MODULE_NAME}-{hashlib.sha256(key.encode()).hexdigest()[:16]}" / f"{MODULE_NAME}{suffix}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / "build.lock", "w") as lock:  # one process builds; the others wait for it
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.exists():
                _build(compiler, target)
    return target


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    extension = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extension)
    return extension


def module() -> Optional[ModuleType]:
    """The kernels' extension module, built and loaded at the first call; None where that is not possible."""
    global _module, _status
    if _module is not None or _status["reason"] != NOT_LOADED:
        return _module
    from metapeft.backend import mx

    try:
        if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "aarch64"):
            raise RuntimeError(f"built and tested on Linux only, not {sys.platform} {platform.machine()}")
        path = _built_path()
        extension = _load(path)
        mx.eval(extension.gelu(mx.zeros((2,))))  # an MLX built with another nanobind ABI refuses MLX's arrays
        _module = extension
        _status = {"available": True, "path": str(path)}
        set_threads(_threads or int(os.environ.get("METAPEFT_NATIVE_THREADS") or 0) or os.cpu_count() or 1)
    except Exception as error:  # noqa: BLE001 - any failure means: MLX's operations, and say why
        _status = {"available": False, "reason": f"{type(error).__name__}: {error}"}
    return _module


def required() -> ModuleType:
    """``module()``, or a RuntimeError saying why it is unavailable."""
    extension = module()
    if extension is None:
        raise RuntimeError(f"metapeft's CPU kernels are unavailable: {_status['reason']}")
    return extension


def set_threads(threads: int) -> None:
    """How many threads a kernel may split its rows over (default: ``$METAPEFT_NATIVE_THREADS``, else the machine's
    cores); parallel sweep jobs and processes of one run set their share, as for OpenBLAS (``metapeft/cli/run.py``)."""
    global _threads
    _threads = max(1, int(threads))
    if _module is not None:
        _module.set_threads(_threads)
        _status["threads"] = _threads
