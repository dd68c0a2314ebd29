"""What the outer loop should learn, in one table (``metapeft.meta_learn_report``).

    python runners/meta_learn_table.py RUN_OR_SWEEP_DIR [...] [--out FILE.md]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from metapeft.errors import ConfigError
from metapeft.io import write_text
from metapeft.meta_learn_report import figure, load_runs, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Runs that differ only in algorithm.meta_learn, side by side, "
                                     "after fine-tuning on the same test episodes.")
    parser.add_argument("runs", nargs="+", type=Path, help="run directories, or a sweep directory holding them")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file, and its figure beside "
                        "it (the same name, .png and .pdf)")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.runs)
        text = table(runs)
    except ConfigError as error:
        parser.error(str(error))
    print(text)
    if args.out:
        write_text(args.out, text)
        figure(runs, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
