"""An optimized BLAS for MLX's CPU matrix products on Linux.

The Linux ``mlx[cpu]`` wheel links the reference (netlib) BLAS it bundles, which makes small matrix products 10x
slower than an optimized library (a 250x40 @ 40x40 float32 product: 0.22 ms against 0.013 ms with OpenBLAS on a
2-core x86-64 machine, ``python runners/blas_check.py``). When ``scipy-openblas32`` (a dependency on Linux) and a C
compiler are present, a tiny shim (``_blas_shim.c``) that forwards ``cblas_sgemm``/``cblas_dgemm`` to it is built
once into the cache directory and loaded into the global symbol scope before MLX, so MLX's calls resolve to
OpenBLAS. Everything else stays MLX's own.

Intel's MKL is the other choice (``pip install -e '.[mkl]'``, x86-64 Linux): its single dynamic library
``libmkl_rt`` defines ``cblas_sgemm`` itself, so it is loaded the same way without a shim, its threads from GNU
OpenMP (``MKL_THREADING_LAYER=GNU`` unless set). On an Intel Xeon it made the encoder's FOMAML step about a tenth
faster than OpenBLAS (docs/performance.md, "Subnormal numbers, and a second processor"); it is not the default,
since elsewhere it was not measured.

Control with environment variables, read at metapeft's first use of MLX (``metapeft.backend.load``):
``METAPEFT_BLAS=auto`` (default: OpenBLAS where available, else the bundled BLAS), ``bundled`` (off),
``openblas`` or ``mkl`` (required: fail if unavailable); ``METAPEFT_BLAS_THREADS=N`` sets the BLAS's thread count
(parallel sweep jobs set 1 so they do not oversubscribe cores). ``status()`` says what is in use; runs record it.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_status: dict = {"backend": "bundled", "reason": "not configured yet"}


def status() -> dict:
    return dict(_status)


def _pool():
    """The loaded BLAS's threads, as threadpoolctl sees them."""
    from threadpoolctl import ThreadpoolController

    if _status["backend"] == "mkl":
        return ThreadpoolController().select(internal_api="mkl")
    return ThreadpoolController().select(prefix="libscipy_openblas")


def set_threads(threads: int) -> None:
    """Set the thread count of the OpenBLAS or MKL loaded for MLX (threadpoolctl); no effect on the bundled BLAS."""
    if _status.get("backend") in ("openblas", "mkl"):
        pool = _pool()
        pool.limit(limits=int(threads))
        _status["threads"] = min(info["num_threads"] for info in pool.info())


def _cache_dir() -> Path:
    return Path(os.environ.get("METAPEFT_CACHE_DIR", "~/.cache/metapeft")).expanduser() / "blas"


def _build_shim(lib_dir: str) -> Path:
    source = Path(__file__).with_name("_blas_shim.c")
    digest = hashlib.sha256(source.read_bytes() + lib_dir.encode()).hexdigest()[:16]
    target = _cache_dir() / f"libmetapeft_blas_shim-{digest}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) to build the BLAS shim")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, "-O2", "-shared", "-fPIC", str(source), "-o", str(built), f"-L{lib_dir}",
                        "-lscipy_openblas", f"-Wl,-rpath,{lib_dir}"], check=True, capture_output=True, text=True)
        os.replace(built, target)  # atomic: concurrent jobs either see the finished file or build their own
    return target


def _load_openblas() -> dict:
    import scipy_openblas32

    lib_dir = scipy_openblas32.get_lib_dir()
    ctypes.CDLL(os.path.join(lib_dir, "libscipy_openblas.so"), mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(str(_build_shim(lib_dir)), mode=ctypes.RTLD_GLOBAL)
    return {"backend": "openblas", "version": scipy_openblas32.__version__}


def _load_mkl() -> dict:
    wheel = importlib.metadata.distribution("mkl")
    library = next((f for f in wheel.files or [] if f.name.startswith("libmkl_rt.so")), None)
    if library is None:
        raise FileNotFoundError(f"no libmkl_rt.so in the mkl {wheel.version} wheel's files")
    os.environ.setdefault("MKL_THREADING_LAYER", "GNU")  # read when libmkl_rt loads its threading library
    ctypes.CDLL(str(library.locate()), mode=ctypes.RTLD_GLOBAL)
    return {"backend": "mkl", "version": wheel.version, "threading": os.environ["MKL_THREADING_LAYER"]}


def configure() -> dict:
    """Load OpenBLAS or MKL for MLX if asked and possible. Call before ``mlx.core`` is imported."""
    global _status
    mode = os.environ.get("METAPEFT_BLAS", "auto")
    if mode not in ("auto", "bundled", "openblas", "mkl"):
        raise ValueError(f"METAPEFT_BLAS={mode!r}: valid values are auto, bundled, openblas, mkl")
    if mode == "bundled":
        _status = {"backend": "bundled", "reason": "METAPEFT_BLAS=bundled"}
        return status()
    if "mlx.core" in sys.modules:
        _status = {"backend": "bundled", "reason": "mlx.core was imported before metapeft; import metapeft first"}
        return status()
    if not sys.platform.startswith("linux"):
        _status = {"backend": "platform", "reason": f"{sys.platform}: MLX uses the platform's BLAS"}
        return status()
    try:
        _status = _load_mkl() if mode == "mkl" else _load_openblas()
        threads = os.environ.get("METAPEFT_BLAS_THREADS")
        if threads:
            set_threads(int(threads))
        else:
            _status["threads"] = min(info["num_threads"] for info in _pool().info())
    except Exception as error:  # noqa: BLE001 - any failure means: keep the bundled BLAS, and say why
        if mode != "auto":  # asked for by name: say so, and how to get it
            install = {"mkl": "pip install -e '.[mkl]' (x86-64 Linux)", "openblas": "pip install scipy-openblas32"}
            raise RuntimeError(f"METAPEFT_BLAS={mode} but it could not be loaded ({type(error).__name__}: {error}); "
                               f"{install[mode]}, or METAPEFT_BLAS=auto") from error
        _status = {"backend": "bundled", "reason": f"OpenBLAS unavailable: {type(error).__name__}: {error}"}
    return status()

