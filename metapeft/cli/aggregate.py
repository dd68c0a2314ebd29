"""Merge sweeps into comparison tables and plots.

    python runners/aggregate.py SWEEP_DIR [SWEEP_DIR ...] [--out DIR]

Writes summary.csv (a row per run), comparison.md / comparison.csv (a row per configuration: runs are pooled only
when they differ in nothing but the seed; for each K the best baseline measured on the same episodes, the
meta-learned figure and the paired difference to that baseline, each as mean ± 95% CI over the pooled seeds that
counts the variance between training runs and between test classes, with Holm-adjusted p-values over the table's
comparisons; seconds per meta-iteration, adapted parameters; failed, diverged, missing and unreadable runs
shown as such, duplicated seeds flagged), baselines.csv (every baseline of every configuration) and PNG plots.
Default output: SWEEP_DIR/report.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from metapeft.report import ReportError, caption, public, write_report


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
    except KeyboardInterrupt:  # the report is moved into place whole: an earlier one is as it was
        print("interrupted: no report written; an earlier report, if any, is intact", file=sys.stderr)
        return 130
    print(caption(result["table"]) + public(result["table"]).to_markdown(index=False, floatfmt=".4g"))
    for problem in result["problems"]:
        print(f"warning: {problem}", file=sys.stderr)
    out = args.out or args.sweep_dirs[0] / "report"
    print(f"\n{result['completed']} of {result['runs']} runs completed; report in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
