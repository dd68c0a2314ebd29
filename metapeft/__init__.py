"""metapeft: meta-learning parameter-efficient adapters for few-shot learning, on MLX."""
from metapeft import blas

blas.configure()  # before any module imports mlx.core: see metapeft/blas.py
