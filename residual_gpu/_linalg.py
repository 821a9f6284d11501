"""The problem's Cholesky factor and triangular solve, in one fixed order of operations.

LAPACK's potrf and BLAS's trsm (OpenBLAS, MKL) block their work by the thread count and the
number of right-hand sides, and round differently for each split: with OpenBLAS, the Cholesky
factor of a 512 x 512 K_UU differs in ~40% of its entries between 1 and 2 threads, and the V
row of a new location differs with the size of the batch it came in (the odd column of a
batch, the split between threads). Users rely on getting the same neighbours, bit for bit,
whatever the batch and the thread count, so these factors are computed here in one order per
entry: each entry is a sequential sum from its left, computed by one thread. The cost stays
small against the search: m^3/6 multiply-adds for the factor, n m^2/2 for V, the latter
vectorised across right-hand sides (SIMD lanes hold different points, so no sum is
reordered).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

#: right-hand sides solved together: the innermost loop runs across them
_SOLVE_BLOCK = 32


@njit(cache=True, fastmath=False)  # m^3/6 is small: one thread, no per-column fork and join
def _cholesky_lower(a, out):
    """out = L with L L^T = a (lower triangle), column by column; returns the first column whose
    pivot is not positive (not positive definite), or -1."""
    m = a.shape[0]
    for i in range(m):
        for j in range(m):
            out[i, j] = 0.0
    for j in range(m):
        d = a[j, j]
        for t in range(j):
            d -= out[j, t] * out[j, t]
        if not d > 0.0:  # also catches nan
            return j
        piv = np.sqrt(d)
        out[j, j] = piv
        for i in range(j + 1, m):
            s = a[i, j]
            for t in range(j):
                s -= out[i, t] * out[j, t]
            out[i, j] = s / piv
    return -1


def cholesky_lower(a: np.ndarray) -> np.ndarray | None:
    """Lower Cholesky factor of the symmetric matrix a (its lower triangle is read), or None
    where a is not numerically positive definite. The same bits for any thread count."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    out = np.empty_like(a)
    return out if _cholesky_lower(a, out) < 0 else None


@njit(parallel=True, cache=True, fastmath=False)
def _solve_lower_columns(chol, b, out):
    m, q = b.shape
    nblocks = (q + _SOLVE_BLOCK - 1) // _SOLVE_BLOCK
    for blk in prange(nblocks):
        j0 = blk * _SOLVE_BLOCK
        w = min(j0 + _SOLVE_BLOCK, q) - j0
        y = np.empty((m, w))
        acc = np.empty(w)
        for u in range(m):
            for j in range(w):
                acc[j] = b[u, j0 + j]
            for t in range(u):
                lut = chol[u, t]
                for j in range(w):
                    acc[j] -= lut * y[t, j]
            d = chol[u, u]
            for j in range(w):
                y[u, j] = acc[j] / d
        for j in range(w):
            for u in range(m):
                out[j0 + j, u] = y[u, j]


def solve_lower_columns(chol: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(L^-1 B)^T, shape (q, m), for lower triangular L (m, m) and B (m, q): forward substitution,
    each column's entries summed from the left in one order, so a column's result does not
    depend on the other columns, their number or the threads (unlike a blocked trsm)."""
    b = np.ascontiguousarray(b, dtype=np.float64)
    out = np.empty((b.shape[1], b.shape[0]))
    _solve_lower_columns(np.ascontiguousarray(chol, dtype=np.float64), b, out)
    return out
