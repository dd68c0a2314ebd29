"""Which BLAS MLX's CPU matmuls use, and what a small float32 product costs with it.

    python runners/blas_check.py                  # OpenBLAS where available (the default)
    METAPEFT_BLAS=bundled python runners/blas_check.py
"""
import time

from metapeft import blas
from metapeft.backend import mx  # loads the BLAS chosen by METAPEFT_BLAS, then MLX

print(blas.status())
a, b = mx.random.normal((250, 40)), mx.random.normal((40, 40))
mx.eval(a @ b)
start = time.perf_counter()
for _ in range(1000):
    mx.eval(a @ b)
print(f"250x40 @ 40x40 float32: {(time.perf_counter() - start):.4f} ms per product (mean of 1000)")
