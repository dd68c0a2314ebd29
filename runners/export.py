"""Export a meta-learned adapter for other tools (``metapeft-export``); see ``metapeft.cli.export``."""
import sys

from metapeft.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
