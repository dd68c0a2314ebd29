"""Merge sweeps into comparison tables and plots.

    python runners/aggregate.py SWEEP_DIR [SWEEP_DIR ...] [--out DIR]

Writes summary.csv (a row per run), comparison.md / comparison.csv (task x algorithm x PEFT: K-shot metric as mean ±
95% CI with seeds pooled, the scratch baseline, seconds per meta-iteration, adapted parameters; failed and
diverged runs shown as such) and PNG plots. Default output: SWEEP_DIR/report.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from metapeft.report import ReportError, public, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dirs", nargs="+", type=Path, help="multirun sweep directories (or run directories)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: FIRST_SWEEP_DIR/report)")
    args = parser.parse_args(argv)
    try:
        result = write_report(args.sweep_dirs, args.out or args.sweep_dirs[0] / "report")
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(public(result["table"]).to_markdown(index=False, floatfmt=".4g"))
    out = args.out or args.sweep_dirs[0] / "report"
    print(f"\n{result['completed']} of {result['runs']} runs completed; report in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
