"""The float64 reference: residual distances and brute-force kNN in plain numpy.

Readable, slow, and the definition every engine is tested against. The only refinement
over the textbook formula is the compensated dot product (Dot2) for V_i . V_j, so that the
reference stays accurate where k(x_i, x_j) - V_i . V_j cancels (tiny residual variance p):

    rho_ij = ((k(x_i, x_j) - s_hi) - s_lo) / sqrt(p_i p_j),   (s_hi, s_lo) = Dot2(V_i, V_j)
    d_ij   = sqrt(1 - min(|rho_ij|, 1)),   d_ii = 0 for a point and itself.

Neighbours are sorted by (distance, index): ties go to the smaller index.
"""

from __future__ import annotations

import numpy as np

from .kernels import Kernel

_SPLITTER = 134217729.0  # 2**27 + 1, Veltkamp's split for float64


def _two_prod(a, b):
    """Error-free product: a * b == p + e exactly."""
    p = a * b
    c = _SPLITTER * a
    ah = c - (c - a)
    al = a - ah
    c = _SPLITTER * b
    bh = c - (c - b)
    bl = b - bh
    return p, al * bl - (((p - ah * bh) - al * bh) - ah * bl)


def _two_sum(a, b):
    """Error-free sum: a + b == s + e exactly."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def dot2_block(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compensated products of every row of a (q, m) with every row of b (c, m): (hi, lo)."""
    hi = np.zeros((a.shape[0], b.shape[0]))
    lo = np.zeros_like(hi)
    for t in range(a.shape[1]):
        prod, err = _two_prod(a[:, t, None], b[None, :, t])
        hi, carry = _two_sum(hi, prod)
        lo += carry + err
    return hi, lo


def residual_rho_block(xq, vq, pq, xc, vc, pc, kernel: Kernel) -> np.ndarray:
    """rho for every (query, candidate) pair, clamped to [-1, 1]."""
    kval = kernel(xq, xc)
    hi, lo = dot2_block(np.asarray(vq, dtype=np.float64), np.asarray(vc, dtype=np.float64))
    rho = ((kval - hi) - lo) / np.sqrt(np.asarray(pq, dtype=np.float64)[:, None] * np.asarray(pc, dtype=np.float64)[None, :])
    return np.clip(rho, -1.0, 1.0)


def distance_from_rho(rho: np.ndarray) -> np.ndarray:
    return np.sqrt(1.0 - np.minimum(np.abs(rho), 1.0))


def residual_distance_reference(coords, v, p, kernel: Kernel, rows, cols) -> np.ndarray:
    """Residual distances between dataset points rows[a] and cols[b]; 0 where they coincide."""
    coords, v, p = (np.asarray(a, dtype=np.float64) for a in (coords, v, p))
    if coords.ndim == 1:
        coords = coords[:, None]
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    dist = distance_from_rho(
        residual_rho_block(coords[rows], v[rows], p[rows], coords[cols], v[cols], p[cols], kernel)
    )
    dist[rows[:, None] == cols[None, :]] = 0.0
    return dist


def select_k_reference(dist: np.ndarray, admissible: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k admissible columns of smallest distance, ties to the smaller column.

    Rows with fewer than k admissible columns are padded with index -1 and distance inf.
    """
    q, n = dist.shape
    idx = np.full((q, k), -1, dtype=np.int64)
    out = np.full((q, k), np.inf)
    cols = np.arange(n)
    for r in range(q):
        ok = cols[admissible[r]]
        order = ok[np.lexsort((ok, dist[r, ok]))][:k]
        idx[r, : order.size] = order
        out[r, : order.size] = dist[r, order]
    return idx, out


def brute_knn_reference(coords, v, p, kernel: Kernel, k: int, queries=None, predecessor: bool = False,
                        query_coords=None, query_v=None, query_p=None) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN by the full reference distance matrix.

    Queries are dataset indices (``queries``, default all points; a point never returns
    itself, and with ``predecessor`` only j < i are admissible) or new locations given by
    their factors (``query_coords``, ``query_v``, ``query_p``; every point is admissible).
    """
    coords, v, p = (np.asarray(a, dtype=np.float64) for a in (coords, v, p))
    if coords.ndim == 1:
        coords = coords[:, None]
    n = coords.shape[0]
    cols = np.arange(n)
    if query_coords is not None:
        xq = np.asarray(query_coords, dtype=np.float64).reshape(-1, coords.shape[1])
        rho = residual_rho_block(xq, query_v, query_p, coords, v, p, kernel)
        admissible = np.ones((xq.shape[0], n), dtype=bool)
        return select_k_reference(distance_from_rho(rho), admissible, k)
    rows = np.arange(n) if queries is None else np.asarray(queries, dtype=np.int64)
    dist = residual_distance_reference(coords, v, p, kernel, rows, cols)
    admissible = rows[:, None] != cols[None, :]
    if predecessor:
        admissible &= cols[None, :] < rows[:, None]
    return select_k_reference(dist, admissible, k)
