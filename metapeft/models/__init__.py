"""Backbones as pure functions: ``init(key) -> params`` and ``model(params, x) -> predictions``."""
