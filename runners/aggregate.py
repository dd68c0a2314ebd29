"""Merge sweeps into comparison tables and plots (``metapeft-aggregate``); see ``metapeft.cli.aggregate``."""
import sys

from metapeft.cli.aggregate import main

if __name__ == "__main__":
    sys.exit(main())
