"""The low-rank leaf filter (``TraversalFlags(filter_rank=r)``): most points of an evaluated leaf
are dropped with a certified bound that costs r, not m, multiply-adds per point.

The node bound (bounds.py) treats the covariance k(x_q, x_j) and the low-rank part V_q . V_j
separately, so it cannot prune leaves within ~2.5 lengthscales of a query, where both are large
and their difference is tiny (docs/tree.md section 2). The filter keeps that cancellation per
point: it evaluates the covariance exactly (the same transform as a leaf block) and replaces
only the m-length product by a rank-r one, with a proven bound on what that costs.

Per leaf B (build time): Q_B, r rows of length m (the leaf's V rows' top right singular
vectors: eigenvectors of V_B V_B^T), and per point j of B: c_j (r coefficients, Q_B V_j),
both rounded to the leaf precision. For a query q the traversal computes
P = fl(Q_B fl(V_q)) once per (query, leaf) and G~_j = fl(P . c_j) per point, and

    |G~_j - V_q . V_j| <= ||V_q|| beta_j,
    beta_j = ||V_j - Q_B^T c_j|| + (gamma_(m+2) + gamma_(r+2) (1 + gamma_(m+2))) sum_i |c_ji| ||Q_i||

(exact algebra: V_q . V_j = (Q_B V_q) . c_j + V_q . (V_j - Q_B^T c_j), Cauchy-Schwarz on the
second term; |P_i - (Q_B V_q)_i| <= gamma_(m+2) ||Q_i|| ||V_q|| covers the rounded input and any
summation order, |fl(P . c_j) - P . c_j| <= gamma_(r+2) sum_i |P_i| |c_ji|; gamma in the leaf
precision's u). Nothing needs Q_B to be orthonormal or c_j optimal: beta_j is computed from the
stored values, so the bound holds whatever the eigen-solver returned. The filter value

    F_qj = min(1, |kval_j - G~_j| / sqrt(p_q p_j)) + w_q e_j + o_j / sqrt(p_q),
    w_q = ||V_q|| / sqrt(p_q),  e_j = beta_j / sqrt(p_j),
    o_j = eta (r + 2 + sqrt(m) sum_i |c_ji| ||Q_i|| + m ||c_j||_1) / sqrt(p_j)

(o_j: underflow, each of the roundings above adds at most eta, the leaf precision's smallest
subnormal, in absolute value; Higham, Accuracy and Stability, section 2.1)

satisfies F_qj + E_q >= |rho_qj| (exact): its first term is the leaf block's transform with G~_j
in place of the product, and the transform's own error (kernel, subtraction, scaling) is within
E_q, the row's certification margin, as for every fast value. So F_qj is what a_dropped may take,
like a fast value that left the heap: a point with F_qj below the row's pruning threshold
(k-th value - 2 E_q) is dropped with it; the others get their m-length product and are folded
as in a leaf block. docs/tree.md section 4c has the measurements.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .._blas import single_blas_thread
from .._numba_math import row_norms
from ..precision import UNIT_ROUNDOFF, gamma

_U = UNIT_ROUNDOFF[np.dtype(np.float64)]
#: each leaf takes the smallest rank of 4, 8, ... up to the flag's whose slack w e_j, for the
#: median point of the leaf and the median w of the tree's points, is at most TAIL_TARGET: far
#: points (true |rho| ~0.01-0.1) then drop below thresholds of ~0.2 and more, while a larger rank
#: costs more per point than it saves. At n = 131072 (docs/tree.md section 4c) the 2048 `vif`
#: leaves take 8 / 12 / 16: 86 / 597 / 1365, the `spatial` ones 4 / 8 / 12: 1538 / 494 / 16 (a
#: fixed rank 8 ran 5-10% faster there than a fixed 16).
TAIL_TARGET = 0.03


@dataclass(frozen=True)
class LeafFilter:
    """The filter's arrays (L leaves, the tree's points in tree order; R the flag's rank)."""

    slot: np.ndarray         # (nodes,) int64: the leaf's row in basis, -1 for internal nodes
    rank: np.ndarray         # (L,) int64: the leaf's rank r_B <= R (basis[l, :r_B], coef[:, :r_B])
    basis: np.ndarray        # (L, R, m) leaf precision: Q_B
    coef: np.ndarray         # (tree points, R) leaf precision: c_j, in tree order
    tail: np.ndarray         # (tree points,) float64: e_j = beta_j / sqrt(p_j) at the leaf's rank, rounded up
    under: np.ndarray        # (tree points,) float64: o_j, the underflow term, rounded up
    tail_median: np.ndarray  # (L,) float64: median of e_j over the leaf (whether to filter a row)
    seconds: float


def build_leaf_filter(tree, v: np.ndarray, p: np.ndarray, max_rank: int, dtype) -> LeafFilter:
    """The filter of ranks up to ``max_rank`` for ``tree``'s leaves: ``v`` and ``p`` the problem's
    (dataset order, float64), ``dtype`` the leaf precision."""
    t0 = time.perf_counter()
    dtype = np.dtype(dtype)
    perm = tree.perm
    npts, m = perm.size, v.shape[1]
    leaves = np.flatnonzero(tree.node_left < 0)
    slot = np.full(tree.nodes, -1, dtype=np.int64)
    slot[leaves] = np.arange(leaves.size)
    starts, ends = tree.node_start[leaves], tree.node_end[leaves]
    basis = np.zeros((leaves.size, max_rank, m), dtype=dtype)
    coef = np.zeros((npts, max_rank), dtype=dtype)
    rank = np.zeros(leaves.size, dtype=np.int64)
    tail = np.zeros(npts)
    under = np.zeros(npts)
    tail_median = np.zeros(leaves.size)
    ip = 1.0 / np.sqrt(p[perm])
    w_typical = float(np.median(row_norms(v)[perm] * ip)) if npts else 0.0
    ladder = np.unique(np.minimum(np.arange(4, max_rank + 4, 4), max_rank)).astype(np.int64)
    # the rounding factors of beta_j per rank (module docstring), in the leaf precision and float64
    g_fast = np.array([gamma(m, dtype) + gamma(r, dtype) * (1.0 + gamma(m, dtype)) for r in range(max_rank + 1)])
    g_64 = np.array([gamma(r) for r in range(max_rank + 1)])
    eta = float(np.finfo(dtype).smallest_subnormal)
    with single_blas_thread():  # one leaf per Numba thread, each with its own small products
        _leaf_bases(np.ascontiguousarray(v, dtype=np.float64), perm, starts, ends, ip, w_typical, ladder, TAIL_TARGET,
                    g_fast, g_64, eta, basis, coef, rank, tail, under, tail_median)
    return LeafFilter(slot, rank, basis, coef, tail, under, tail_median, time.perf_counter() - t0)


@njit(parallel=True, cache=True, fastmath=False)
def _leaf_bases(v, perm, starts, ends, ip, w_typical, ladder, target, g_fast, g_64, eta, basis, coef, rank, tail,
                under, tail_median):
    """Per leaf (one task each): the basis (top eigenvectors of V_B V_B^T, scaled to unit rows;
    those of near-zero eigenvalues stay zero), the stored coefficients, the leaf's rank (the
    smallest of ``ladder`` whose estimated median slack w_typical * e_j is at most ``target``, the
    tails an orthonormal basis would leave) and, at that rank, e_j and o_j from the stored values
    with every rounding of their float64 evaluation covered (module docstring)."""
    m = v.shape[1]
    big = basis.shape[1]
    for leaf in prange(starts.shape[0]):
        s = starts[leaf]
        cnt = ends[leaf] - s
        if cnt == 0:
            continue
        vb = np.empty((cnt, m))
        for i in range(cnt):
            for t in range(m):
                vb[i, t] = v[perm[s + i], t]
        lam, vec = np.linalg.eigh(vb @ vb.T)  # ascending
        q = np.zeros((big, m))
        for i in range(min(big, cnt)):
            lv = lam[cnt - 1 - i]
            if lv > lam[cnt - 1] * cnt * 1e-13 + 1e-300:
                sc = 1.0 / np.sqrt(lv)
                for j in range(cnt):
                    f = vec[j, cnt - 1 - i] * sc
                    for t in range(m):
                        q[i, t] += f * vb[j, t]
        for i in range(big):
            for t in range(m):
                basis[leaf, i, t] = q[i, t]
                q[i, t] = basis[leaf, i, t]  # the stored (rounded) values from here on
        c = vb @ q.T
        for j in range(cnt):
            for i in range(big):
                coef[s + j, i] = c[j, i]
                c[j, i] = coef[s + j, i]
        # the leaf's rank
        vn2 = np.empty(cnt)  # ||V_j||^2, once for every rank tried
        for j in range(cnt):
            acc = 0.0
            for t in range(m):
                acc += vb[j, t] * vb[j, t]
            vn2[j] = acc
        est = np.empty(cnt)
        chosen = big
        for a in range(ladder.shape[0]):
            r = ladder[a]
            for j in range(cnt):
                left = vn2[j]
                for i in range(r):
                    left -= c[j, i] * c[j, i]
                est[j] = np.sqrt(max(left, 0.0)) * ip[s + j]
            if np.median(est) * w_typical <= target:
                chosen = r
                break
        rank[leaf] = chosen
        # e_j and o_j at that rank: ||V_j - Q^T c_j|| (each entry within g_64 (|Q|^T |c_j|)_t + u of
        # the computed one), s_j = sum_i |c_ji| ||Q_i||, ||c_j||_1
        qn = np.empty(chosen)
        for i in range(chosen):
            acc = 0.0
            for t in range(m):
                acc += q[i, t] * q[i, t]
            qn[i] = np.sqrt(acc) * (1.0 + (m + 2) * _U)
        for j in range(cnt):
            acc = 0.0
            for t in range(m):
                rt = vb[j, t]
                for i in range(chosen):
                    rt -= c[j, i] * q[i, t]
                acc += rt * rt
            tn = np.sqrt(acc) * (1.0 + (m + 4) * _U)
            sj = 0.0
            c1 = 0.0
            for i in range(chosen):
                sj += abs(c[j, i]) * qn[i]
                c1 += abs(c[j, i])
            sj *= 1.0 + (big + 2) * _U
            c1 *= 1.0 + (big + 2) * _U
            beta = (tn + (2.0 * g_64[chosen] + g_fast[chosen]) * sj) * (1.0 + 4.0 * _U)
            o = eta * (chosen + 2.0 + np.sqrt(m) * sj + m * c1) * (1.0 + 4.0 * _U)
            tail[s + j] = beta * ip[s + j] * (1.0 + 8.0 * _U)
            under[s + j] = o * ip[s + j] * (1.0 + 8.0 * _U)
        tail_median[leaf] = np.median(tail[s:s + cnt])
