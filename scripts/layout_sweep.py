"""Float32 tree query seconds against the layout's two sizes: leaf size and first index block.

    PYTHONPATH=. python scripts/layout_sweep.py --suite vif --n 32768 --leaf-sizes 32,48,64,128 --block-divisors 2,4,8,16,32

Each row builds one index and times two all-points predecessor queries (the first may include
Numba's compilation). The block divisor D is ``tree.layout.block_bounds``'s ``first_block_divisor`` (the first index
block holds max(ceil(n / D), 32 * leaf_size) points; the package uses 16), set here for the
measurement only.
"""

from __future__ import annotations

import argparse
import functools
import time

import residual_gpu as rg
from residual_gpu.suites import get_suite
from residual_gpu.tree import layout


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
        layout.block_bounds = functools.partial(default_blocks, first_block_divisor=divisor)
        try:
            index = rg.ResidualIndex(prob, method="tree", precision="float32", leaf_size=leaf_size)
            seconds = []
            for _ in range(2):
                t0 = time.perf_counter()
                index.query(case.k, predecessor=True, progress=False)
                seconds.append(round(time.perf_counter() - t0, 2))
        finally:
            layout.block_bounds = default_blocks
        blocks = default_blocks(case.n, leaf_size, first_block_divisor=divisor).tolist()
        print(f"leaf_size={leaf_size} divisor={divisor} blocks={blocks} query_s={seconds}", flush=True)


if __name__ == "__main__":
    main()
