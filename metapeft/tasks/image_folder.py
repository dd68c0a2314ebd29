"""N-way K-shot classification over a user's image folder in the Omniglot layout.

    ROOT/images_background/<alphabet>/<character>/*.png     meta-train classes
    ROOT/images_evaluation/<alphabet>/<character>/*.png     meta-validation and meta-test classes (split by seed)

Every character at every quarter-turn rotation is its own class (rotation augmentation, as in Santoro et al. 2016
and MAML). Images are read as grayscale, resized to ``image_size`` and scaled to [0, 1]. Nothing is downloaded:
point ``task.root`` at a folder you have.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from metapeft.errors import ConfigError, require
from metapeft.registry import TASKS
from metapeft.tasks.base import TaskConfig
from metapeft.tasks.classification import ClassImagesTask

PARTS = {"train": "images_background", "eval": "images_evaluation"}
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


@dataclass
class OmniglotLayoutConfig(TaskConfig):
    """What every task in the Omniglot layout shares: episodes, image size and the evaluation split."""

    n_way: int = 5
    num_query: int = 5  # per class; Omniglot has 20 images per character
    image_size: int = 28
    rotations: bool = True  # each quarter-turn rotation of a character is a new class
    val_fraction: float = 0.5  # of the evaluation characters, for meta-validation; the rest are meta-test
    split_seed: int = 0
    default_inner_lr: float = 0.4  # MAML's Omniglot inner learning rate
    default_meta_batch_size: int = 4


@dataclass
class ImageFolderConfig(OmniglotLayoutConfig):
    name: str = "image_folder"
    root: Optional[str] = None


def read_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as error:
        raise ConfigError("task.root", f"{path} is not a readable image ({error})") from error


def read_part(directory: Path, size: int) -> dict[str, np.ndarray]:
    """alphabet/character -> images (n, size, size)."""
    if not directory.is_dir():
        raise ConfigError("task.root", f"{directory} is missing; expected the Omniglot layout "
                          f"ROOT/{{{', '.join(PARTS.values())}}}/<alphabet>/<character>/*.png")
    characters = {}
    for character in sorted(p for p in directory.glob("*/*") if p.is_dir()):
        files = sorted(f for f in character.iterdir() if f.suffix.lower() in EXTENSIONS)
        if files:
            characters[f"{character.parent.name}/{character.name}"] = np.stack([read_image(f, size) for f in files])
    if not characters:
        raise ConfigError("task.root", f"{directory} holds no images in <alphabet>/<character>/ folders")
    return characters


@TASKS.register("image_folder", ImageFolderConfig)
class ImageFolder(ClassImagesTask):
    def __init__(self, cfg: ImageFolderConfig):
        require(cfg.root is not None, "task.root", "give the folder: task.root=/path/to/omniglot")
        root = Path(cfg.root).expanduser()
        require(root.is_dir(), "task.root", f"{root} does not exist or is not a folder")
        require(cfg.image_size >= 4, "task.image_size", f"must be >= 4, got {cfg.image_size}")
        check_split(cfg)
        background = read_part(root / PARTS["train"], cfg.image_size)
        evaluation = read_part(root / PARTS["eval"], cfg.image_size)
        require(len(evaluation) >= 2, "task.root", f"{root / PARTS['eval']} needs at least two characters "
                "(meta-validation and meta-test)")
        classes, sources = omniglot_splits(cfg, background, evaluation)
        super().__init__(cfg, classes, (cfg.image_size, cfg.image_size), class_sources=sources)


def check_split(cfg: OmniglotLayoutConfig) -> None:
    """Refuse an impossible evaluation split before any image is read or generated."""
    require(0 < cfg.val_fraction < 1, "task.val_fraction", f"must be in (0, 1), got {cfg.val_fraction}")


def omniglot_splits(cfg, background: dict[str, np.ndarray], evaluation: dict[str, np.ndarray]):
    """(split -> class images, split -> class sources): background characters meta-train, evaluation characters
    split between meta-validation and meta-test by ``cfg.split_seed``; each quarter-turn a class if
    ``cfg.rotations``, the rotations of one character sharing its source."""
    names = sorted(evaluation)
    order = np.random.default_rng(cfg.split_seed).permutation(len(names))
    n_val = min(len(names) - 1, max(1, round(cfg.val_fraction * len(names))))
    characters = {"train": [background[n] for n in sorted(background)],
                  "val": [evaluation[names[i]] for i in order[:n_val]],
                  "test": [evaluation[names[i]] for i in order[n_val:]]}
    turns = range(4) if cfg.rotations else range(1)
    classes = {split: [np.ascontiguousarray(np.rot90(images, k, axes=(1, 2))) for images in chars for k in turns]
               for split, chars in characters.items()}
    sources = {split: [i for i in range(len(chars)) for _ in turns] for split, chars in characters.items()}
    return classes, sources
