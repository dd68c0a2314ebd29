"""Re-run a published headline from a fresh cache and say whether it lands inside the published interval
(``metapeft.reproduce``).

    python runners/reproduce.py [NAME] [--seeds 0,1,2] [--out SWEEP_DIR] [OVERRIDE ...]

Exit 0 when the reproduced mean lies inside the published 95% interval, 1 when outside, 2 on bad input.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from metapeft.reproduce import HEADLINES, reproduce


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", default=next(iter(HEADLINES)), choices=sorted(HEADLINES),
                        help="the headline to reproduce (default: %(default)s)")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the published ones)")
    parser.add_argument("--out", type=Path, help="the sweep directory (default: multirun/reproduce-NAME-TIME)")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run (a smaller budget, say)")
    args = parser.parse_intermixed_args(argv)  # the overrides may follow --seeds and --out
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None
    except ValueError:
        parser.error(f"--seeds {args.seeds}: give comma-separated integers, e.g. 0,1,2")
    out = args.out or Path("multirun") / f"reproduce-{args.name}-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    print(f"running {args.name} from an empty cache into {out} ...", file=sys.stderr)
    try:
        agrees, line = reproduce(args.name, out, seeds, args.overrides)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(line)
    return 0 if agrees else 1


if __name__ == "__main__":
    sys.exit(main())
