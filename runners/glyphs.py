"""The glyph benchmark's sanity figures: generate it (once, into the cache) and show what it holds.

    python runners/glyphs.py [--image-size 28] [--grid FILE.png] [--cache-dir DIR]

Prints the characters of every alphabet and its part (background: meta-training; evaluation: meta-validation and
meta-test) as a Markdown table, the folder to point ``task=image_folder task.root=`` at, and with ``--grid`` writes
an image: one row per character drawn at random from each part, ten of its instances across.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from metapeft import glyph_benchmark
from metapeft.tasks.glyphs import GlyphsConfig


def sample_grid(directory: Path, rows_per_part: int, path: Path, seed: int = 0) -> None:
    from PIL import Image

    parts = glyph_benchmark.load(directory)
    rng = np.random.default_rng(seed)
    rows = []
    for part in ("background", "evaluation"):
        names = sorted(parts[part])
        for i in rng.choice(len(names), rows_per_part, replace=False):
            rows.append(np.concatenate(list(parts[part][names[i]][:10]), axis=1))
        rows.append(np.full((4, rows[-1].shape[1]), 0.5))  # a grey rule between the parts
    grid = (np.concatenate(rows[:-1]) * 255).astype(np.uint8)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = GlyphsConfig()
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--grid", type=Path, help="write a sample grid to this PNG")
    parser.add_argument("--cache-dir", default=os.environ.get("METAPEFT_CACHE_DIR", "~/.cache/metapeft"))
    args = parser.parse_args(argv)
    settings = glyph_benchmark.Settings(args.image_size, defaults.instances, defaults.max_characters_per_alphabet,
                                        defaults.min_characters_per_alphabet, defaults.evaluation_fraction,
                                        defaults.generation_seed)
    directory = glyph_benchmark.ensure(args.cache_dir, settings)
    manifest = json.loads((directory / "manifest.json").read_text())
    print("| alphabet (Unicode block) | characters | part |\n|---|---|---|")
    for name, facts in sorted(manifest["alphabets"].items(), key=lambda item: (item[1]["part"], item[0])):
        print(f"| {name} | {facts['characters']} | {facts['part']} |")
    counts = manifest["characters"]
    print(f"\n{len(manifest['alphabets'])} alphabets, {sum(counts.values())} characters ({counts['background']} "
          f"background, {counts['evaluation']} evaluation), {settings.instances} instances each, "
          f"{len(manifest['fonts'])} fonts\nfolder: {directory}")
    if args.grid:
        sample_grid(directory, 6, args.grid)
        print(f"sample grid: {args.grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
