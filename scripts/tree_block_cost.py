"""Cost per (query, candidate) pair of the tree's leaf blocks against brute force's GEMM.

    python scripts/tree_block_cost.py [--n 32768] [--leaves 200]

On one thread, for the `vif` suite: one tile of 128 queries evaluates the first ``--leaves``
leaves of the tree with 128, 70 (the measured average) and 30 alive rows, through the
traversal's own block evaluator (`backends.cpu._eval_block`: gather of the alive V rows, the
small product `_numba_gemm.gemm_nt`, fused kernel transform, heap pushes), next to that product
alone and BLAS's GEMM of the same shape (Numba's np.dot) alone, in float64 and in float32 (the
leaf precision "auto" picks where its certified margin is small), and one large float64 GEMM of the tile against 12,800 candidates (brute force's
shape). Every number is nanoseconds per pair, medians of 5 runs in this process, so the
ratios are what matters.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np
from numba import njit
from threadpoolctl import threadpool_limits

import residual_gpu as rg
from residual_gpu._numba_gemm import gemm_nt
from residual_gpu.backends import cpu as cpu_backend
from residual_gpu.suites import get_suite


@njit(cache=True)
def _products(nrows, qv, pv, starts, ends, blas):
    """The leaf products alone: the tree's gemm_nt, or BLAS (Numba's np.dot) for comparison."""
    pairs = 0
    for li in range(starts.size):
        s0 = starts[li]
        w = ends[li] - s0
        if blas:
            np.dot(qv[:nrows], pv[s0:s0 + w].T)
        else:
            gemm_nt(qv[:nrows], pv[s0:s0 + w], np.empty((nrows, w), dtype=qv.dtype))
        pairs += nrows * w
    return pairs


def _ns_per_pair(fn, repeats=5):
    times = []
    pairs = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        pairs = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / pairs * 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--leaves", type=int, default=200)
    args = ap.parse_args()
    case = get_suite("vif", args.n)
    prob = rg.ResidualProblem(case.coords, kernel=case.kernel, inducing=case.inducing, seed=case.seed)
    index = rg.ResidualIndex(prob, backend="cpu", method="tree", progress=False)
    s, tr = index._searcher, index.tree
    q, n = 128, prob.n
    rows_q = np.arange(n // 2, n // 2 + q)
    qx, qv, qp = prob.coords[rows_q], np.ascontiguousarray(prob.v[rows_q]), prob.p[rows_q]
    qip, qself, qlimit = 1.0 / np.sqrt(qp), rows_q.copy(), np.full(q, n, dtype=np.int64)
    keep = case.k + max(8, case.k // 2)
    # steady state: full heaps whose minimum most values fall below
    heap_a, heap_i = np.full((q, keep), 0.5), np.zeros((q, keep), dtype=np.int64)
    count, a_dropped = np.full(q, keep, dtype=np.int64), np.full(q, -1.0)
    kth_a, kth_n = np.full((q, case.k), 0.5), np.full(q, case.k, dtype=np.int64)
    leaves = np.flatnonzero(tr.node_left < 0)[:args.leaves]
    starts, ends = tr.node_start[leaves], tr.node_end[leaves]
    row, work = np.empty(s.blk_cap), np.empty((3, s.blk_cap))
    sel = np.arange(q, dtype=np.int64)

    def blocks(nrows, qv_blk, pv_blk, qbuf_blk):
        pairs = 0
        for a, b in zip(starts, ends):
            pairs += cpu_backend._eval_block(
                0, s.kernel_id, s.variance, sel, np.int64(nrows), np.int64(0), a, b, s.pidx, s.pxt, s.pip, pv_blk,
                qx, qv_blk, s.inv_scale, qip, qself, qlimit, heap_a, heap_i, count, a_dropped, kth_a, kth_n,
                qbuf_blk, row, work, False, qp, s.pp, s.scale)
        return pairs

    pv64 = np.ascontiguousarray(prob.v[s.pidx])  # V in tree order, float64 (the searcher may keep float32 only)
    big = pv64[:12800]
    with threadpool_limits(1):
        print(f"vif n={n}, m={prob.m}, leaves of ~{np.mean(ends - starts):.0f} points, one thread; ns per pair")
        print("precision | alive rows | tree block (all steps) | its product (gemm_nt) alone | BLAS GEMM alone")
        for dtype in (np.float64, np.float32):
            qv_d, pv_d = qv.astype(dtype), pv64.astype(dtype)
            qbuf_d = np.empty((q, prob.m), dtype=dtype)
            blocks(q, qv_d, pv_d, qbuf_d)
            _products(q, qv_d, pv_d, starts, ends, True)
            _products(q, qv_d, pv_d, starts, ends, False)
            for nrows in (128, 70, 30):
                full = _ns_per_pair(partial(blocks, nrows, qv_d, pv_d, qbuf_d))
                own = _ns_per_pair(partial(_products, nrows, qv_d, pv_d, starts, ends, False))
                blas = _ns_per_pair(partial(_products, nrows, qv_d, pv_d, starts, ends, True))
                print(f"{np.dtype(dtype).name} | {nrows} | {full:.1f} | {own:.1f} | {blas:.1f}")

        def one_gemm():
            qv @ big.T
            return q * big.shape[0]

        print(f"brute-force shape GEMM (128 x {prob.m}) @ ({prob.m} x 12800): {_ns_per_pair(one_gemm):.1f}")


if __name__ == "__main__":
    main()
