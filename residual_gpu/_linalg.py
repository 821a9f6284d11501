"""The problem's Cholesky factor and its factors V = (L^-1 K(U, X))^T, in one fixed order of operations.

LAPACK's potrf and BLAS's trsm (OpenBLAS, MKL) block their work by the thread count and the
number of right-hand sides, and round differently for each split: with OpenBLAS, the Cholesky
factor of a 512 x 512 K_UU differs in ~40% of its entries between 1 and 2 threads, and the V
row of a new location differs with the size of the batch it came in (the odd column of a
batch, the split between threads). Users rely on getting the same neighbours, bit for bit,
whatever the batch and the thread count, so these factors are computed here in one order per
entry: each entry is a sequential sum from its left, computed by one thread. The cost stays
small against the search: m^3/6 multiply-adds for the factor, n m^2/2 for V, the latter
vectorised across right-hand sides (SIMD lanes hold different points, so no sum is
reordered). V is built in one pass (``cross_factors``): per block of points K(U, X) with the
accurate path's kernel values, solved in place, then p and the row norms, so that no n x m
array other than V is ever formed.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._numba_math import _SQRT3, _SQRT5, _dot2_step, portable_exp_nonpositive_inplace

#: points solved together: the innermost loops run across them (SIMD lanes hold different points)
_SOLVE_BLOCK = 32
#: rows of V's block solved together, sharing each solved row's loads (_subtract_solved_rows8)
_ROW_GROUP = 8


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


@njit(inline="always", cache=True)
def _kernel_row(kernel_id, variance, ua, xt, scale, row, work):
    """row[j] = variance * correlation(kernel_id, scaled_sq_distance(ua, x_j, scale)) bitwise, for the
    block's points x_j = xt[:, j], in loops across the block that vectorise."""
    width = row.shape[0]
    for j in range(width):
        row[j] = 0.0
    for t in range(ua.shape[0]):
        ut = ua[t]
        s = scale[t]
        for j in range(width):
            diff = (ut - xt[t, j]) / s
            row[j] += diff * diff
    if kernel_id == 0:
        for j in range(width):
            row[j] = -0.5 * row[j]
        portable_exp_nonpositive_inplace(row, work[0])
    elif kernel_id == 1:
        for j in range(width):
            row[j] = -math.sqrt(row[j])
        portable_exp_nonpositive_inplace(row, work[0])
    else:
        c = _SQRT3 if kernel_id == 2 else _SQRT5
        r2_coef = 0.0 if kernel_id == 2 else 5.0 / 3.0
        poly = work[1]
        for j in range(width):
            sr = c * math.sqrt(row[j])
            poly[j] = 1.0 + sr + r2_coef * row[j]
            row[j] = -sr
        portable_exp_nonpositive_inplace(row, work[0])
        for j in range(width):
            row[j] = poly[j] * row[j]
    for j in range(width):
        row[j] = variance * row[j]


@njit(parallel=True, cache=True, fastmath=False)
def _cross_factors(chol, u, x, scale, kernel_id, variance, floor, out, p, norms):
    """out = V for chol and u padded to mp (a multiple of _ROW_GROUP) rows; out has the m real
    columns (a row of V depends only on the rows above it, so the padding never reaches them).
    p_i = max(floor, (variance - hi) - lo) with (hi, lo) = dot2(V_i, V_i), and norms as row_norms,
    from the block while it is in cache: each lane runs their operations in their order, so the
    bits are theirs on out's rows. p is a difference of nearly equal numbers wherever the
    inducing points explain almost all of the variance, hence Dot2."""
    n, m = out.shape
    mp, d = u.shape
    nblocks = (n + _SOLVE_BLOCK - 1) // _SOLVE_BLOCK
    for blk in prange(nblocks):
        j0 = blk * _SOLVE_BLOCK
        w = min(j0 + _SOLVE_BLOCK, n) - j0
        xt = np.empty((d, _SOLVE_BLOCK))
        for t in range(d):  # a short last block repeats its last point: every loop has full width
            for j in range(_SOLVE_BLOCK):
                xt[t, j] = x[j0 + min(j, w - 1), t]
        y = np.empty((mp, _SOLVE_BLOCK))
        acc = np.empty((_ROW_GROUP, _SOLVE_BLOCK))
        work = np.empty((2, _SOLVE_BLOCK))
        for a0 in range(0, mp, _ROW_GROUP):
            for i in range(_ROW_GROUP):
                _kernel_row(kernel_id, variance, u[a0 + i], xt, scale, acc[i], work)
            _subtract_solved_rows8(chol, y, acc, a0)
            for i in range(_ROW_GROUP):  # the group's own triangle, then the pivot
                for t in range(a0, a0 + i):
                    lat = chol[a0 + i, t]
                    for j in range(_SOLVE_BLOCK):
                        acc[i, j] -= lat * y[t, j]
                piv = chol[a0 + i, a0 + i]
                for j in range(_SOLVE_BLOCK):
                    y[a0 + i, j] = acc[i, j] / piv
        for j in range(w):
            for a in range(m):
                out[j0 + j, a] = y[a, j]
        hi, lo, sq = work[0], work[1], np.empty(_SOLVE_BLOCK)
        for j in range(_SOLVE_BLOCK):
            hi[j] = 0.0
            lo[j] = 0.0
            sq[j] = 0.0
        for a in range(m):
            for j in range(_SOLVE_BLOCK):
                ya = y[a, j]
                hi[j], lo[j] = _dot2_step(hi[j], lo[j], ya, ya)
                sq[j] += ya * ya
        for j in range(w):
            p[j0 + j] = max(floor, (variance - hi[j]) - lo[j])
            norms[j0 + j] = math.sqrt(sq[j])


@njit(inline="always", cache=True)
def _subtract_solved_rows8(chol, y, acc, a0):
    """acc[i] -= sum_(t < a0) L[a0 + i, t] y[t] for the 8 rows of a group, t ascending for every
    entry. Written out so that each loaded y[t] serves the 8 rows and each load and store of acc
    two t (a0 is even): 4-5x faster than a row and a t at a time (measured), with each entry's
    operations in the same order."""
    for t in range(0, a0, 2):
        l0, l1, l2, l3 = chol[a0, t], chol[a0 + 1, t], chol[a0 + 2, t], chol[a0 + 3, t]
        l4, l5, l6, l7 = chol[a0 + 4, t], chol[a0 + 5, t], chol[a0 + 6, t], chol[a0 + 7, t]
        k0, k1, k2, k3 = chol[a0, t + 1], chol[a0 + 1, t + 1], chol[a0 + 2, t + 1], chol[a0 + 3, t + 1]
        k4, k5, k6, k7 = chol[a0 + 4, t + 1], chol[a0 + 5, t + 1], chol[a0 + 6, t + 1], chol[a0 + 7, t + 1]
        for j in range(_SOLVE_BLOCK):
            y0 = y[t, j]
            y1 = y[t + 1, j]
            acc[0, j] = (acc[0, j] - l0 * y0) - k0 * y1
            acc[1, j] = (acc[1, j] - l1 * y0) - k1 * y1
            acc[2, j] = (acc[2, j] - l2 * y0) - k2 * y1
            acc[3, j] = (acc[3, j] - l3 * y0) - k3 * y1
            acc[4, j] = (acc[4, j] - l4 * y0) - k4 * y1
            acc[5, j] = (acc[5, j] - l5 * y0) - k5 * y1
            acc[6, j] = (acc[6, j] - l6 * y0) - k6 * y1
            acc[7, j] = (acc[7, j] - l7 * y0) - k7 * y1


def cross_factors(chol: np.ndarray, inducing: np.ndarray, coords: np.ndarray, kernel,
                  p_floor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(V, p, ||V_i||) for coordinates (q, d): V = (L^-1 K(U, X))^T, shape (q, m), for the lower
    Cholesky factor L of K(U, U) + jitter I, K(U, X) formed one block of points at a time (the
    accurate path's kernel value, ``variance * correlation(...)`` with portable_exp, bitwise)
    and solved in place by forward substitution, each entry summed from the left in one order;
    p = max(variance - ||V_i||^2, p_floor * variance) with ||V_i||^2 from Dot2, and the norms
    as ``row_norms`` computes them. A row depends on its point alone: not on the block, the
    number of points or the threads (unlike a blocked trsm)."""
    coords = np.ascontiguousarray(coords, dtype=np.float64)
    q, m = coords.shape[0], inducing.shape[0]
    mp = -(-m // _ROW_GROUP) * _ROW_GROUP
    # padding: copies of the last inducing point, unit rows of L (only ever divided by 1)
    u = np.concatenate([inducing, np.repeat(inducing[-1:], mp - m, axis=0)]).astype(np.float64)
    lp = np.eye(mp)
    lp[:m, :m] = chol
    v, p, norms = np.empty((q, m)), np.empty(q), np.empty(q)
    _cross_factors(lp, u, coords, kernel.lengthscales(coords.shape[1]), kernel.kernel_id, kernel.variance,
                   p_floor * kernel.variance, v, p, norms)
    return v, p, norms
