"""N-way K-shot text classification over your own data: a folder of CSV or JSON Lines files with a text column and a
label column (names set by ``task.text_column`` / ``task.label_column``). A class is a label.

    ROOT/train.csv  ROOT/val.csv  ROOT/test.csv      classes split by you (each label in one split only)
    ROOT/data.csv  (or task.root=FILE)                one file, its labels split into meta-train / -val / -test
                                                      by task.val_fraction, task.test_fraction and task.split_seed

``.jsonl`` works wherever ``.csv`` does. Empty texts are dropped; a label left with none, a missing column, a label in
two splits or too few texts for K support + ``num_query`` query examples are refused before any work, naming the file.
Tokenized by the run's model (``model=hf_encoder``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from metapeft.errors import ConfigError, require
from metapeft.registry import TASKS
from metapeft.tasks.base import TaskConfig
from metapeft.tasks.classification import SPLITS
from metapeft.tasks.text_classes import TextClassesTask

FORMATS = (".csv", ".jsonl")


@dataclass
class TextFolderConfig(TaskConfig):
    name: str = "text_folder"
    root: Optional[str] = None  # a folder (train/val/test files, or one data file) or a single file
    text_column: str = "text"
    label_column: str = "label"
    n_way: int = 5
    num_query: int = 5
    default_inner_lr: float = 0.3
    default_meta_batch_size: int = 2
    val_fraction: float = 0.2  # of the labels, when one file is split by class
    test_fraction: float = 0.3
    split_seed: int = 0


def find(root: Path, stem: str) -> Path | None:
    found = [root / f"{stem}{suffix}" for suffix in FORMATS if (root / f"{stem}{suffix}").is_file()]
    if len(found) > 1:
        raise ConfigError("task.root", f"{root} holds both {found[0].name} and {found[1].name}; keep one")
    return found[0] if found else None


def read_classes(path: Path, cfg: TextFolderConfig) -> dict[str, list[str]]:
    """label -> its non-empty texts, from one CSV or JSON Lines file."""
    import pandas as pd

    try:
        frame = (pd.read_json(path, lines=True, dtype=False) if path.suffix == ".jsonl"
                 else pd.read_csv(path, dtype=str, keep_default_na=False))
    except (ValueError, OSError, pd.errors.ParserError) as error:
        raise ConfigError("task.root", f"{path} is not readable {path.suffix[1:].upper()} ({error})") from error
    for key in ("text_column", "label_column"):
        column = getattr(cfg, key)
        require(column in frame.columns, f"task.{key}", f"'{column}' is not a column of {path}; its columns: "
                f"{[str(c) for c in frame.columns]}")
    texts = frame[cfg.text_column].fillna("").astype(str).str.strip()
    labels = frame[cfg.label_column].astype(str)
    classes: dict[str, list[str]] = {}
    for label, text in zip(labels, texts):
        classes.setdefault(label, [])
        if text:
            classes[label].append(text)
    require(len(classes) > 0, "task.root", f"{path} has no rows")
    for label, kept in classes.items():
        require(len(kept) > 0, "task.root", f"class '{label}' in {path} has no non-empty text")
    return classes


@TASKS.register("text_folder", TextFolderConfig)
class TextFolder(TextClassesTask):
    def __init__(self, cfg: TextFolderConfig):
        require(cfg.root is not None, "task.root", "give your data: task.root=DIR (train/val/test.csv or data.csv, "
                "or .jsonl) or task.root=FILE")
        root = Path(cfg.root).expanduser()
        require(root.exists(), "task.root", f"{root} does not exist")
        split_files = {s: find(root, s) for s in SPLITS} if root.is_dir() else {}
        if split_files and all(split_files.values()):
            per_split = {s: read_classes(split_files[s], cfg) for s in SPLITS}
            seen: dict[str, str] = {}
            for split in SPLITS:
                for label in per_split[split]:
                    require(label not in seen, "task.root", f"class '{label}' is in both "
                            f"{split_files[seen.get(label, split)]} and {split_files[split]}: meta-train, -validation "
                            "and -test classes must be disjoint")
                    seen[label] = split
        else:
            single = root if root.is_file() else find(root, "data")
            require(single is not None, "task.root", f"{root} holds neither train, val and test files nor one data "
                    f"file ({' or '.join(FORMATS)}); found: {sorted(p.name for p in root.iterdir())[:10]}")
            per_split = split_by_class(read_classes(single, cfg), cfg, single)
        names = {s: sorted(per_split[s]) for s in SPLITS}
        super().__init__(cfg, {s: [per_split[s][n] for n in names[s]] for s in SPLITS}, names)


def split_by_class(classes: dict[str, list[str]], cfg: TextFolderConfig, path: Path) -> dict[str, dict]:
    """The labels of one file split into meta-train / -val / -test by fractions, seeded."""
    require(0 < cfg.val_fraction < 1 and 0 < cfg.test_fraction < 1 and cfg.val_fraction + cfg.test_fraction < 1,
            "task.val_fraction", f"val_fraction and test_fraction must each be in (0, 1) and sum below 1, got "
            f"{cfg.val_fraction} and {cfg.test_fraction}")
    labels = sorted(classes)
    order = [labels[i] for i in np.random.default_rng(cfg.split_seed).permutation(len(labels))]
    n_test, n_val = round(cfg.test_fraction * len(labels)), round(cfg.val_fraction * len(labels))
    parts = {"test": order[:n_test], "val": order[n_test: n_test + n_val], "train": order[n_test + n_val:]}
    return {split: {label: classes[label] for label in part} for split, part in parts.items()}
