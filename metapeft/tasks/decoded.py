"""Images decoded and resized once, then cached: a benchmark of JPEG files (miniImageNet's 60,000) takes minutes
to decode, so the arrays are kept in the cache under a name hashed from every file read (its path relative to the
root, size and modification time) and the target size; a changed, added or removed file is a new entry."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from metapeft import io
from metapeft.errors import ConfigError

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def read_rgb(path: Path, size: int) -> np.ndarray:
    """One image as uint8 (size, size, 3): converted to RGB, resized with bilinear filtering, as the public
    miniImageNet pipelines do."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as error:
        raise ConfigError("task.root", f"{path} is not a readable image ({error})") from error


def cache_key(root: Path, files: list[Path], size: int) -> str:
    listing = [(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    identity = json.dumps({"version": FORMAT_VERSION, "size": size, "files": listing})
    return hashlib.sha256(identity.encode()).hexdigest()[:20]


def decoded(root: Path, files: list[Path], size: int, cache_dir: str | Path, name: str) -> np.ndarray:
    """``files`` (under ``root``) as one uint8 array (n, size, size, 3), from the cache or decoded now."""
    path = Path(cache_dir).expanduser() / f"{name}-{size}px-{cache_key(root, files, size)}.npy"
    if path.is_file():
        try:
            return np.load(path)
        except (OSError, ValueError) as error:  # damaged outside metapeft: decoded again, as on a miss
            log.warning("the decoded images %s cannot be read (%s); decoding them again", path, error)
    log.info("decoding %d images of %s into %s (once; reused after)", len(files), root, path)
    images = np.stack([read_rgb(f, size) for f in tqdm(files, desc=f"decode {name}", disable=None, leave=False,
                                                           mininterval=1.0)])
    io.save_array(path, images)
    return images
