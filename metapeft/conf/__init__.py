"""The configs (Hydra finds them here, from a checkout or an installed package)."""
