"""GFLOP/s of the tree's small product (`_numba_gemm.gemm_nt`) on one leaf-block shape, next to
one-thread OpenBLAS on a large product of the same precision (docs/benchmarks.md, "The leaf
blocks' own product").

    python scripts/gemm_nt_rate.py [--rows 128] [--cols 64] [--k 512]

Best of 5 runs of 2000 products, one thread each (gemm_nt is serial; BLAS limited to one thread).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np
from threadpoolctl import threadpool_limits

from residual_gpu._numba_gemm import gemm_nt


def best_seconds(fn, calls: int, runs: int = 5) -> float:
    best = np.inf
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--cols", type=int, default=64)
    ap.add_argument("--k", type=int, default=512)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print("dtype | gemm_nt GFLOP/s | OpenBLAS (1024 x k) @ (k x 8192), one thread, GFLOP/s")
    for dtype in (np.float32, np.float64):
        a = rng.standard_normal((args.rows, args.k)).astype(dtype)
        b = rng.standard_normal((args.cols, args.k)).astype(dtype)
        out = np.empty((args.rows, args.cols), dtype=dtype)
        gemm_nt(a, b, out)  # compile outside the timing
        small = best_seconds(partial(gemm_nt, a, b, out), 2000)
        big_a = rng.standard_normal((1024, args.k)).astype(dtype)
        big_b = rng.standard_normal((args.k, 8192)).astype(dtype)
        with threadpool_limits(1):
            big = best_seconds(partial(np.matmul, big_a, big_b), 1)
        print(f"{np.dtype(dtype).name} | {2 * args.rows * args.cols * args.k / small / 1e9:.1f} | "
              f"{2 * 1024 * args.k * 8192 / big / 1e9:.1f}")


if __name__ == "__main__":
    main()
