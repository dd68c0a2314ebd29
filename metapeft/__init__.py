"""metapeft: meta-learning parameter-efficient adapters for few-shot learning, on MLX."""
from metapeft import affinity, blas

blas.configure()  # before any module imports mlx.core: see metapeft/blas.py
affinity.record_mlx_threads()  # starts MLX's CPU stream thread and notes which it is: see metapeft/affinity.py
