"""metapeft: meta-learning parameter-efficient adapters for few-shot learning, on MLX.

Importing metapeft or any of its modules loads no MLX and starts nothing: MLX is loaded, after the BLAS it should
use, at its first use (``metapeft.backend``).
"""
