"""CPU backend: BLAS (through numpy) for V_Q V_C^T, Numba for the fused transform and select.

Per (query tile, candidate tile) the GEMM writes G = V_Q V_C^T; one Numba pass per query row
then forms r^2 from direct coordinate differences, the kernel, a = |k - G| / sqrt(p_q p_j),
and pushes admissible candidates into that query's bounded min-heap. Only one tile of G is
alive at a time, so memory is O(tile) whatever n is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .._numba_math import _SQRT3, _SQRT5, exp_nonpositive_inplace
from .base import Backend, Candidates, QueryBatch

QUERY_TILE = 256
CANDIDATE_TILE = 2048


@dataclass(frozen=True)
class _Prepared:
    xt: np.ndarray          # (d, n) coordinates, transposed so a row loop over candidates vectorises
    v: np.ndarray           # (n, m)
    inv_sqrt_p: np.ndarray  # (n,)
    inv_scale: np.ndarray   # (d,) 1 / lengthscale
    kernel_id: int
    variance: float
    n: int


@njit(inline="always", cache=True, fastmath={"contract"})
def _abs_rho_row(kernel_id, variance, xq, inv_scale, ipq, xt, ip, c0, g, out, work):
    """out[b] = min(|variance * corr(r2(xq, x_c0+b)) - g[b]| * ipq * ip[c0+b], 1), b < out.size.

    xt and ip are the whole (contiguous) arrays, offset by c0, so loops stay unit-stride;
    work is scratch of shape (3, >= out.size).
    """
    width = out.shape[0]
    r2 = work[0, :width]
    sr = work[1, :width]
    for b in range(width):
        r2[b] = 0.0
    for t in range(xq.shape[0]):
        x0 = xq[t]
        s = inv_scale[t]
        for b in range(width):
            diff = (x0 - xt[t, c0 + b]) * s
            r2[b] += diff * diff
    # One branch-free loop per family, so that each vectorises.
    if kernel_id == 0:
        for b in range(width):
            out[b] = -0.5 * r2[b]
        exp_nonpositive_inplace(out, work[2])
    elif kernel_id == 1:
        for b in range(width):
            out[b] = -math.sqrt(r2[b])
        exp_nonpositive_inplace(out, work[2])
    else:
        c = _SQRT3 if kernel_id == 2 else _SQRT5
        r2_coef = 0.0 if kernel_id == 2 else 5.0 / 3.0
        for b in range(width):
            sr[b] = c * math.sqrt(r2[b])
            out[b] = -sr[b]
        exp_nonpositive_inplace(out, work[2])
        for b in range(width):
            out[b] *= 1.0 + sr[b] + r2_coef * r2[b]
    for b in range(width):
        a = abs(variance * out[b] - g[b]) * ipq * ip[c0 + b]
        out[b] = a if a < 1.0 else 1.0


@njit(parallel=True, cache=True, fastmath={"contract"})
def _dense_tile(kernel_id, variance, qx, inv_scale, qip, xt, ip, g):
    out = np.empty(g.shape)
    for r in prange(g.shape[0]):
        work = np.empty((3, g.shape[1]))
        _abs_rho_row(kernel_id, variance, qx[r], inv_scale, qip[r], xt, ip, 0, g[r], out[r], work)
    return out


@njit(inline="always", cache=True)
def _sift_down(ha, hi, size):
    """Restore the min-heap (on ha) after its root was replaced."""
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and ha[child + 1] < ha[child]:
            child += 1
        if ha[child] >= ha[pos]:
            break
        ha[pos], ha[child] = ha[child], ha[pos]
        hi[pos], hi[child] = hi[child], hi[pos]
        pos = child


@njit(inline="always", cache=True)
def _heap_push(ha, hi, size, a, j):
    pos = size
    ha[pos] = a
    hi[pos] = j
    while pos > 0:
        parent = (pos - 1) // 2
        if ha[parent] <= ha[pos]:
            break
        ha[pos], ha[parent] = ha[parent], ha[pos]
        hi[pos], hi[parent] = hi[parent], hi[pos]
        pos = parent


@njit(parallel=True, cache=True, fastmath={"contract"})
def _select_tile(kernel_id, variance, qx, inv_scale, qip, qself, qlimit, xt, ip, g, c0,
                 heap_a, heap_i, count, a_dropped, evaluations):
    """Fold one candidate tile (columns c0 .. c0 + g.shape[1]) into every query's heap.

    The heap keeps the ``keep`` largest fast |rho|; whatever leaves it or never enters
    raises ``a_dropped``, which certification compares against the k-th kept value.
    """
    keep = heap_a.shape[1]
    for r in prange(g.shape[0]):
        width = min(qlimit[r] - c0, g.shape[1])
        if width <= 0:
            continue
        row = np.empty(width)
        work = np.empty((3, width))
        _abs_rho_row(kernel_id, variance, qx[r], inv_scale, qip[r], xt, ip, c0, g[r], row, work)
        ha = heap_a[r]
        hi = heap_i[r]
        size = count[r]
        dropped = a_dropped[r]
        skip = qself[r] - c0
        for b in range(width):
            if b == skip:
                continue
            a = row[b]
            if size < keep:
                _heap_push(ha, hi, size, a, c0 + b)
                size += 1
            elif a > ha[0]:
                if ha[0] > dropped:
                    dropped = ha[0]
                ha[0] = a
                hi[0] = c0 + b
                _sift_down(ha, hi, size)
            elif a > dropped:
                dropped = a
        count[r] = size
        a_dropped[r] = dropped
        evaluations[r] += width - (1 if 0 <= skip < width else 0)


class CpuBackend(Backend):
    """Numba + BLAS on the host; always available."""

    name = "cpu"

    @classmethod
    def availability(cls):
        return True, "numba and numpy's BLAS"

    def prepare(self, problem):
        return _Prepared(
            xt=np.ascontiguousarray(problem.coords.T),
            v=problem.v,
            inv_sqrt_p=1.0 / np.sqrt(problem.p),
            inv_scale=1.0 / problem.lengthscales,
            kernel_id=problem.kernel.kernel_id,
            variance=problem.kernel.variance,
            n=problem.n,
        )

    def abs_rho_tile(self, prepared, batch: QueryBatch, cols: np.ndarray) -> np.ndarray:
        cols = np.asarray(cols, dtype=np.int64)
        g = batch.v @ prepared.v[cols].T
        return _dense_tile(prepared.kernel_id, prepared.variance, batch.coords, prepared.inv_scale,
                           1.0 / np.sqrt(batch.p), np.ascontiguousarray(prepared.xt[:, cols]),
                           prepared.inv_sqrt_p[cols], g)

    def select_candidates(self, prepared, batch: QueryBatch, keep: int) -> Candidates:
        q = batch.size
        heap_a = np.full((q, keep), -1.0)
        heap_i = np.full((q, keep), -1, dtype=np.int64)
        count = np.zeros(q, dtype=np.int64)
        a_dropped = np.full(q, -1.0)
        evaluations = np.zeros(q, dtype=np.int64)
        qip = 1.0 / np.sqrt(batch.p)
        for q0 in range(0, q, QUERY_TILE):
            rows = slice(q0, min(q0 + QUERY_TILE, q))
            stop = int(batch.limit[rows].max())
            for c0 in range(0, stop, CANDIDATE_TILE):
                c1 = min(c0 + CANDIDATE_TILE, stop)
                gt = batch.v[rows] @ prepared.v[c0:c1].T
                _select_tile(prepared.kernel_id, prepared.variance, batch.coords[rows], prepared.inv_scale,
                             qip[rows], batch.self_index[rows], batch.limit[rows], prepared.xt,
                             prepared.inv_sqrt_p, gt, c0, heap_a[rows], heap_i[rows], count[rows],
                             a_dropped[rows], evaluations[rows])
        return Candidates(index=heap_i, abs_rho=heap_a, a_dropped=a_dropped, evaluations=int(evaluations.sum()))
