"""Float32 tree query seconds against the layout's two sizes: leaf size and first index block.

    PYTHONPATH=. python scripts/layout_sweep.py --suite vif --n 32768 --leaf-sizes 32,48,64,128 --block-divisors 2,4,8,16,32

Each row builds one index and times two all-points predecessor queries (the first may include
Numba's compilation). The block divisor D sets the first index block to max(ceil(n / D),
32 * leaf_size) (the package uses D = 16, ``tree.layout.block_bounds``); it is patched here for
the measurement only.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import residual_gpu as rg
from residual_gpu.suites import get_suite
from residual_gpu.tree import layout


def blocks_with_divisor(divisor: int):
    def block_bounds(n: int, leaf_size: int) -> np.ndarray:
        s0 = max(-(-n // divisor), 32 * leaf_size)
        out = [0]
        b = s0
        while b < n:
            out.append(b)
            b *= 2
        out.append(n)
        return np.asarray(out, dtype=np.int64)
    return block_bounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="vif", choices=["vif", "spatial"])
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--leaf-sizes", default="32,48,64,128")
    ap.add_argument("--block-divisors", default="2,4,8,16,32")
    args = ap.parse_args()
    case = get_suite(args.suite, args.n)
    prob = rg.ResidualProblem(case.coords, kernel=case.kernel, inducing=case.inducing, seed=case.seed)
    default_blocks = layout.block_bounds
    rows = [(int(s), 16) for s in args.leaf_sizes.split(",")]
    rows += [(layout.DEFAULT_LEAF_SIZE, int(d)) for d in args.block_divisors.split(",")]
    for leaf_size, divisor in rows:
        layout.block_bounds = blocks_with_divisor(divisor)
        try:
            index = rg.ResidualIndex(prob, method="tree", precision="float32", leaf_size=leaf_size)
            seconds = []
            for _ in range(2):
                t0 = time.perf_counter()
                index.query(case.k, predecessor=True, progress=False)
                seconds.append(round(time.perf_counter() - t0, 2))
        finally:
            layout.block_bounds = default_blocks
        blocks = blocks_with_divisor(divisor)(case.n, leaf_size).tolist()
        print(f"leaf_size={leaf_size} divisor={divisor} blocks={blocks} query_s={seconds}", flush=True)


if __name__ == "__main__":
    main()
