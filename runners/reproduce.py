"""Re-run a published headline from a fresh cache (``metapeft-reproduce``); see ``metapeft.cli.reproduce``."""
import sys

from metapeft.cli.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
