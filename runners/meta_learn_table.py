"""Runs that differ only in algorithm.meta_learn, side by side (``metapeft-meta-learn-table``); see
``metapeft.cli.meta_learn_table``."""
import sys

from metapeft.cli.meta_learn_table import main

if __name__ == "__main__":
    sys.exit(main())
