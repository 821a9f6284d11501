"""The tree's bounds: the node summaries built with the tree, and the query-time bound on |rho|.

docs/tree.md derives both, precisely enough to re-implement; this module follows it:

- Node summaries (section 1, "Node summaries (residual metric)"), computed once at build time
  by ``_summaries``: per node the interval centre ``mid`` and radius ``rad`` of the rows
  z_j = (T V_j) / sqrt(p_j) in the inducing basis (T = chol(K_UU + jitter), so T V_j = k(U, x_j)),
  the range [ymin, ymax] of 1/sqrt(p_j), zeta = max_j ||V_j|| / sqrt(p_j) and ||max(|zlo|, |zhi|)||,
  each widened by its rounding slack.
- The bound (section 2, "The bound" and its "Derivation"): per query the factors
  a_q = T^-T V_q with their error bounds (``query_factors``), per (query, node) the products
  s0 = a_q . mid and sr = |a_q| . rad (one GEMM each over a batch of nodes, or
  ``_sequential_products``) and from them ``residual_bound``, an upper bound U_qN >= |rho_qj| for
  every j of node N whose every rounding error is covered by a slack term; section 4a covers the
  float32 products of float32 leaves (gam_prod).

The ``sequential`` variants (``_transform_rows_sequential``, ``_solve_sequential``,
``_sequential_products``) are the parity preset's (section 5a): fixed-order loops instead of
BLAS and LAPACK, so that the Rust oracle reproduces the bits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.linalg
from numba import njit, prange

from .._blas import solve_transposed
from .._numba_math import correlation, residual_norms, row_norms

if TYPE_CHECKING:
    from .layout import SearchTree

_U = 2.0**-53
#: Rows of V transformed at once while building the summaries.
_SUMMARY_CHUNK = 8192


# --------------------------------------------------------------------------------------
# node summaries (build time)
# --------------------------------------------------------------------------------------
@njit(parallel=True, cache=True, fastmath=False)
def _transform_rows_sequential(t, v, y):
    """z[j, u] = (sum_{w <= u} T[u, w] V[j, w]) * y_j, summed from 0.0 in ascending w.

    The parity preset's replacement for dtrmm: one fixed order, no FMA, so the Rust oracle
    reproduces the node summaries bit for bit.
    """
    z = np.empty(v.shape)
    for j in prange(v.shape[0]):
        for u in range(t.shape[0]):
            s = 0.0
            for w in range(u + 1):
                s += t[u, w] * v[j, w]
            z[j, u] = s * y[j]
    return z


@njit(cache=True, fastmath=False)
def _leaf_minmax(z, c0, leaf_ids, node_start, node_end, zlo, zhi, y, vnorm, ymin, ymax, zeta):
    """Per leaf (rows of z are tree positions c0, c0+1, ...): coordinate box and scalars."""
    for li in range(leaf_ids.size):
        nd = leaf_ids[li]
        a = node_start[nd] - c0
        b = node_end[nd] - c0
        m = z.shape[1]
        for t in range(m):
            lo = z[a, t]
            hi = lo
            for r in range(a + 1, b):
                v = z[r, t]
                lo = min(lo, v)
                hi = max(hi, v)
            zlo[nd, t] = lo
            zhi[nd, t] = hi
        y0 = y[a]
        y1 = y[a]
        zt = 0.0
        for r in range(a, b):
            y0 = min(y0, y[r])
            y1 = max(y1, y[r])
            w = vnorm[r] * y[r]
            zt = max(zt, w)
        ymin[nd] = y0
        ymax[nd] = y1
        zeta[nd] = zt


@njit(cache=True, fastmath=False)
def _merge_up(node_left, node_right, zlo, zhi, ymin, ymax, zeta):
    """Internal nodes' summaries from their children (reverse preorder: children first)."""
    for nd in range(node_left.size - 1, -1, -1):
        a = node_left[nd]
        if a < 0:
            continue
        b = node_right[nd]
        for t in range(zlo.shape[1]):
            zlo[nd, t] = min(zlo[a, t], zlo[b, t])
            zhi[nd, t] = max(zhi[a, t], zhi[b, t])
        ymin[nd] = min(ymin[a], ymin[b])
        ymax[nd] = max(ymax[a], ymax[b])
        zeta[nd] = max(zeta[a], zeta[b])


def _summaries(tree: SearchTree, v: np.ndarray, p: np.ndarray, v_norms: np.ndarray, transform: np.ndarray,
               bar, sequential: bool) -> None:
    """Set the tree's node summaries (node_mid, node_rad, node_ymin, node_ymax, node_zeta,
    node_zabs) from V, p and T, leaves a chunk of rows at a time, then merged up; ``sequential``:
    the fixed-order transform (the parity preset) instead of dtrmm. ``bar`` counts the rows."""
    nn = tree.nodes
    m = v.shape[1]
    zlo = np.empty((nn, m))
    zhi = np.empty((nn, m))
    ymin = np.empty(nn)
    ymax = np.empty(nn)
    zeta = np.empty(nn)
    leaves = np.flatnonzero(tree.node_left < 0)
    leaves = leaves[np.argsort(tree.node_start[leaves], kind="stable")]
    y_all = 1.0 / np.sqrt(p)
    pos = 0
    li = 0
    npts = tree.perm.size
    while pos < npts:
        # whole leaves, about _SUMMARY_CHUNK rows at a time
        lj = li
        while lj < leaves.size and tree.node_end[leaves[lj]] - pos <= _SUMMARY_CHUNK:
            lj += 1
        lj = max(lj, li + 1)
        end = int(tree.node_end[leaves[lj - 1]])
        rows = tree.perm[pos:end]
        vc = v[rows]
        y = y_all[rows]
        if transform.size and sequential:
            z = _transform_rows_sequential(transform, vc, y)
        else:
            if transform.size:
                # z = (T V_j) scaled: columns of T V^T, computed on the transposed (Fortran-order)
                # view so that BLAS copies nothing; z itself is then C-ordered again
                z = scipy.linalg.blas.dtrmm(1.0, transform, vc.T, side=0, lower=1, trans_a=0).T
            else:
                z = np.array(vc)
            z *= y[:, None]
        _leaf_minmax(np.ascontiguousarray(z), pos, leaves[li:lj], tree.node_start, tree.node_end, zlo, zhi, y,
                     v_norms[rows], ymin, ymax, zeta)
        bar.update(end - pos)
        pos = end
        li = lj
    _merge_up(tree.node_left, tree.node_right, zlo, zhi, ymin, ymax, zeta)
    zabs = np.maximum(np.abs(zlo), np.abs(zhi))
    tree.node_mid = (zlo + zhi) * 0.5
    # the interval [mid - rad, mid + rad] must contain [zlo, zhi] despite the rounding of mid and rad
    tree.node_rad = (zhi - zlo) * 0.5 + 4.0 * _U * zabs
    tree.node_ymin = ymin
    tree.node_ymax = ymax
    tree.node_zeta = zeta * (1.0 + 4.0 * _U)
    tree.node_zabs = row_norms(zabs) * (1.0 + (m + 2) * _U)


# --------------------------------------------------------------------------------------
# the bound (query time)
# --------------------------------------------------------------------------------------
@njit(inline="always", cache=True)
def box_distances(xq, inv_scale, lo, hi):
    """(min, max) over the box [lo, hi] of the scaled squared distance to xq, in float64."""
    mind2 = 0.0
    maxd2 = 0.0
    for t in range(xq.shape[0]):
        x = xq[t]
        gap = lo[t] - x
        g2 = x - hi[t]
        gap = max(gap, g2)
        gap = max(gap, 0.0)
        gap *= inv_scale[t]
        far = abs(x - lo[t])
        f2 = abs(hi[t] - x)
        far = max(far, f2)
        far *= inv_scale[t]
        mind2 += gap * gap
        maxd2 += far * far
    return mind2, maxd2


@njit(inline="always", cache=True)
def residual_bound(kernel_id, variance, kerr, eps_d, gam, gam_prod, tnorm, xq, inv_scale, ipq, rnq, naq,
                   lo, hi, ymin, ymax, zeta, zabs, s0, sr):
    """Upper bound on |rho_qj| for every j of a node (docs/tree.md, "The bound").

    s0 = fl(a_q . mid) and sr = fl(|a_q| . rad) from the node's summary; every rounding
    error is covered by the slack terms (eps_d, kerr, gam, the u factors).
    """
    mind2, maxd2 = box_distances(xq, inv_scale, lo, hi)
    kmax = variance * correlation(kernel_id, mind2 * (1.0 - eps_d)) * (1.0 + 4.0 * _U) + kerr
    kmin = variance * correlation(kernel_id, maxd2 * (1.0 + eps_d)) * (1.0 - 4.0 * _U) - kerr
    kmin = max(kmin, 0.0)
    ky_hi = kmax * ymax * (1.0 + 4.0 * _U)
    ky_lo = kmin * ymin * (1.0 - 4.0 * _U)
    err = zeta * (rnq + gam * naq * tnorm) + 2.0 * gam_prod * naq * zabs + 4.0 * _U * (abs(s0) + sr)
    hi_num = ky_hi - s0 + sr + err
    lo_num = ky_lo - s0 - sr - err
    num = max(-lo_num, hi_num)
    u = num * ipq * (1.0 + 16.0 * _U)
    return min(1.0, u)


@njit(parallel=True, cache=True, fastmath=False)
def _solve_sequential(t, v):
    """a = T^-T v_q by back substitution and back = T^T a, row by row, in fixed order (the
    parity preset's replacement for the LAPACK solve and dtrmm)."""
    m = t.shape[0]
    a = np.empty(v.shape)
    back = np.empty(v.shape)
    for q in prange(v.shape[0]):
        for u in range(m - 1, -1, -1):
            s = v[q, u]
            for w in range(u + 1, m):
                s -= t[w, u] * a[q, w]
            a[q, u] = s / t[u, u]
        for u in range(m):
            s = 0.0
            for w in range(u, m):
                s += t[w, u] * a[q, w]
            back[q, u] = s
    return a, back


@njit(cache=True, fastmath=False)
def _sequential_products(amat, absa, mid, rad):
    """s0 = amat @ mid.T and sr = absa @ rad.T, each entry summed from 0.0 in ascending order
    (the parity preset's replacement for the two bound GEMMs)."""
    s0 = np.empty((amat.shape[0], mid.shape[0]), dtype=mid.dtype)
    sr = np.empty((amat.shape[0], mid.shape[0]), dtype=mid.dtype)
    for i in range(amat.shape[0]):
        for e in range(mid.shape[0]):
            a = 0.0
            b = 0.0
            for t in range(amat.shape[1]):
                a += amat[i, t] * mid[e, t]
                b += absa[i, t] * rad[e, t]
            s0[i, e] = a
            sr[i, e] = b
    return s0, sr


def query_factors(t: np.ndarray, v: np.ndarray, gam: float, tnorm: float, sequential: bool = False):
    """(a_q = T^-T V_q, bound rn_q on ||V_q - T^T a_q||, bound na_q on ||a_q||) for query rows v
    (docs/tree.md section 2; T of size (0, 0) is the identity); gam and tnorm as the searcher's.
    ``sequential``: fixed-order loops instead of LAPACK and BLAS (the parity preset)."""
    m = v.shape[1]
    grow = 1.0 + (m + 2) * _U
    if not t.size:
        a = np.array(v)
        return a, np.zeros(v.shape[0]), row_norms(a) * grow
    if sequential:
        a, back = _solve_sequential(t, np.ascontiguousarray(v))
    else:
        # BLAS's trsm and trmm, one call pair per Numba thread (_blas.py); the residual below is
        # measured, so the rounding of the split (rows per call) needs no assumption
        a, back = solve_transposed(t, v)
    na = row_norms(a) * grow
    rn = residual_norms(v, back) * grow + gam * tnorm * na
    return a, rn, na


@njit(parallel=True, cache=True, fastmath=False)
def _bound_matrix(kernel_id, variance, kerr, eps_d, gam, gam_prod, tnorm, node_lo, node_hi, node_ymin, node_ymax,
                  node_zeta, node_zabs, s0, sr, qx, inv_scale, qip, qrn, qna, out):
    for i in prange(qx.shape[0]):
        for nd in range(node_lo.shape[0]):
            out[i, nd] = residual_bound(kernel_id, variance, kerr, eps_d, gam, gam_prod, tnorm, qx[i], inv_scale, qip[i],
                                        qrn[i],
                                        qna[i], node_lo[nd], node_hi[nd], node_ymin[nd], node_ymax[nd], node_zeta[nd],
                                        node_zabs[nd], s0[i, nd], sr[i, nd])
