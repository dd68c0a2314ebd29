"""The metapeft runner: ``python runners/run.py [group=option ...] [key=value ...]`` (``metapeft-run`` once
installed); see ``metapeft.cli.run``."""
from metapeft.cli.run import cli

if __name__ == "__main__":
    cli()
