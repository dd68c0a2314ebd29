"""Few-shot language identification on human-written text that ships with Babel: the Unicode CLDR's names of
languages, territories, scripts, currencies, months and weekdays as each language writes them (``Ligue arabe``,
``Ufaransa``, ``Alemanya``). A class is a language; an example is one such name.

Built once from ``babel``'s locale data (no download) and cached: every base locale (``fr``, not ``fr_CA``), its
names normalized (NFC); a string written identically (case-insensitively) by two languages names no language and is
dropped; languages left with fewer than ``min_examples`` strings are dropped, the others keep ``examples_per_class``
of theirs (seeded). With Babel 2.19 (CLDR 47): 206 languages. Languages are split into disjoint meta-train /
meta-validation / meta-test sets by ``split_seed``; related languages (Spanish, Galician) may land in different
splits, as related characters of one alphabet do in Omniglot's.

License: CLDR data is under the Unicode License v3 (permissive, attribution); Babel is BSD-3-Clause.
"""
from __future__ import annotations

import hashlib
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metapeft import io
from metapeft.errors import ConfigError, require
from metapeft.registry import TASKS
from metapeft.tasks.base import TaskConfig
from metapeft.tasks.classification import SPLITS
from metapeft.tasks.text_classes import TextClassesTask

NAME_TABLES = ("languages", "territories", "scripts", "currencies")


@dataclass
class TextConfig(TaskConfig):
    name: str = "text"
    n_way: int = 5
    num_query: int = 5  # per class; every text costs an encoder pass
    default_inner_lr: float = 0.3  # plain LoRA on MiniLM, 5-shot validation tasks: 0.56 after 1 step (0.43 at 0.1)
    default_meta_batch_size: int = 2
    min_examples: int = 100  # languages with fewer distinct names are left out
    examples_per_class: int = 100
    num_val_classes: int = 30
    num_test_classes: int = 50  # the rest are meta-train classes
    split_seed: int = 0
    cache_dir: str = "${oc.select:paths.cache_dir,'~/.cache/metapeft'}"


def language_names() -> dict[str, list[str]]:
    """language code -> the names (of languages, territories, ...) written in it that no other language writes."""
    try:
        from babel import Locale, localedata
    except ImportError as error:
        raise ConfigError("task", f'task=text reads Babel\'s CLDR data: pip install -e ".[text]" ({error})') from error
    names: dict[str, set[str]] = {}
    for code in sorted(c for c in localedata.locale_identifiers() if "_" not in c and c != "root"):
        locale = Locale.parse(code)
        strings = {v for table in NAME_TABLES for v in getattr(locale, table).values()}
        for calendar in (locale.months, locale.days):
            strings |= set(calendar.get("format", {}).get("wide", {}).values())
        names[code] = {unicodedata.normalize("NFC", s).strip() for s in strings} - {""}
    writers = Counter(s.casefold() for strings in names.values() for s in strings)
    return {code: sorted(s for s in strings if writers[s.casefold()] == 1) for code, strings in names.items()}


def corpus(cache_dir: str) -> dict[str, list[str]]:
    """``language_names``, cached under the Babel version that produced it."""
    try:
        import babel
    except ImportError as error:
        raise ConfigError("task", f'task=text reads Babel\'s CLDR data: pip install -e ".[text]" ({error})') from error

    directory = Path(cache_dir).expanduser()
    key = hashlib.sha256(f"cldr-names-1-{babel.__version__}".encode()).hexdigest()[:16]
    path = directory / f"text-cldr-{key}.json"
    if path.is_file():
        return io.read_json(path)
    names = language_names()
    directory.mkdir(parents=True, exist_ok=True)
    io.write_json(path, names)
    return names


@TASKS.register("text", TextConfig)
class Text(TextClassesTask):
    def __init__(self, cfg: TextConfig):
        require(cfg.examples_per_class >= 2, "task.examples_per_class", f"must be >= 2, got {cfg.examples_per_class}")
        require(cfg.min_examples >= cfg.examples_per_class, "task.min_examples",
                f"must be >= task.examples_per_class={cfg.examples_per_class}, got {cfg.min_examples}")
        for key in ("num_val_classes", "num_test_classes"):
            require(getattr(cfg, key) >= 1, f"task.{key}", f"must be >= 1, got {getattr(cfg, key)}")
        names = {code: s for code, s in corpus(cfg.cache_dir).items() if len(s) >= cfg.min_examples}
        codes = sorted(names)
        n_train = len(codes) - cfg.num_val_classes - cfg.num_test_classes
        require(n_train >= cfg.n_way, "task.num_test_classes", f"{len(codes)} languages have >= {cfg.min_examples} "
                f"names; num_val_classes + num_test_classes = {cfg.num_val_classes + cfg.num_test_classes} leave "
                f"{n_train} for meta-training, fewer than task.n_way={cfg.n_way}")
        rng = np.random.default_rng(cfg.split_seed)
        order = [codes[i] for i in rng.permutation(len(codes))]
        split_codes = {"test": order[: cfg.num_test_classes],
                       "val": order[cfg.num_test_classes: cfg.num_test_classes + cfg.num_val_classes],
                       "train": order[cfg.num_test_classes + cfg.num_val_classes:]}
        texts = {s: [[names[c][i] for i in sorted(rng.choice(len(names[c]), cfg.examples_per_class, replace=False))]
                     for c in split_codes[s]] for s in SPLITS}
        super().__init__(cfg, texts, {s: split_codes[s] for s in SPLITS})
