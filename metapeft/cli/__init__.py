"""The command lines: ``metapeft-run`` (the Hydra app), ``metapeft-aggregate``, ``metapeft-export`` and
``metapeft-meta-learn-table`` once installed; ``python runners/<name>.py`` from a checkout runs the same code."""
