"""N-way K-shot classification on the glyph benchmark (``metapeft.glyph_benchmark``): an Omniglot-like set of
about two thousand characters in about thirty alphabets, rendered from the fonts matplotlib ships, generated into
the cache on first use (no download) and reused after.

Meta-training classes come from the background alphabets; meta-validation and meta-test classes are disjoint sets
of characters from the evaluation alphabets, which meta-training never sees. The same folder can be read with
``task=image_folder task.root=<cache>/glyphs-<key>`` (the run's log names the folder).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from metapeft import glyph_benchmark
from metapeft.errors import require
from metapeft.registry import TASKS
from metapeft.tasks.classification import ClassImagesTask
from metapeft.tasks.image_folder import OmniglotLayoutConfig, check_split, omniglot_splits

log = logging.getLogger(__name__)


@dataclass
class GlyphsConfig(OmniglotLayoutConfig):
    name: str = "glyphs"
    rotations: bool = False  # with two thousand characters, quarter-turns are not needed to make classes
    val_fraction: float = 0.33  # 200 meta-validation characters, 406 meta-test
    # What the benchmark is generated with (its cache folder is named by a hash of these and the font files).
    instances: int = 20
    max_characters_per_alphabet: int = 100
    min_characters_per_alphabet: int = 10
    evaluation_fraction: float = 0.3
    generation_seed: int = 0
    cache_dir: str = "${oc.select:paths.cache_dir,'~/.cache/metapeft'}"


@TASKS.register("glyphs", GlyphsConfig)
class Glyphs(ClassImagesTask):
    def __init__(self, cfg: GlyphsConfig):
        require(8 <= cfg.image_size <= 64, "task.image_size", f"must be in 8..64, got {cfg.image_size}")
        require(cfg.instances >= 2, "task.instances", f"must be >= 2, got {cfg.instances}")
        require(cfg.min_characters_per_alphabet >= 1, "task.min_characters_per_alphabet",
                f"must be >= 1, got {cfg.min_characters_per_alphabet}")
        require(cfg.max_characters_per_alphabet >= cfg.min_characters_per_alphabet,
                "task.max_characters_per_alphabet", f"must be >= task.min_characters_per_alphabet "
                f"({cfg.min_characters_per_alphabet}), got {cfg.max_characters_per_alphabet}")
        require(0 < cfg.evaluation_fraction < 1, "task.evaluation_fraction",
                f"must be in (0, 1), got {cfg.evaluation_fraction}")
        check_split(cfg)
        settings = glyph_benchmark.Settings(cfg.image_size, cfg.instances, cfg.max_characters_per_alphabet,
                                            cfg.min_characters_per_alphabet, cfg.evaluation_fraction,
                                            cfg.generation_seed)
        self.directory, parts = glyph_benchmark.ensure_loaded(cfg.cache_dir, settings)
        log.info("glyph benchmark: %s", self.directory)
        classes, sources = omniglot_splits(cfg, parts["background"], parts["evaluation"])
        super().__init__(cfg, classes, (cfg.image_size, cfg.image_size), class_sources=sources)
