"""Turning fast candidates into exact neighbours: certification and accurate re-ranking.

Ranking is by the reference distance D(a) = sqrt(1 - a) in float64, a = |rho| clamped to
[0, 1], ties to the smaller index. Rounding makes D flat where a is tiny (every a below
~1e-16 gives D = 1.0), so certification works on distances, not on a. For each query the
backend kept the ``keep`` candidates with the largest fast a and reported the largest fast
a it dropped. With E the query's rounding margin (precision.query_margins), an exact a lies
in [a_fast - E, a_fast + E], so its distance lies in [D(a_fast + E), D(a_fast - E)]. Let
a_k be the k-th largest kept value and hi_k = D(a_k - E), an upper bound on the exact k-th
distance:

- if the dropped maximum has D(a_dropped + E) <= hi_k, a dropped candidate could tie with
  or beat the k-th neighbour: the query is *not certified* and the caller searches it
  again with a larger ``keep``;
- otherwise the exact top k are among the kept candidates with D(a_fast + E) <= hi_k (the
  "contenders"); those are recomputed with the accurate formula (Dot2, as the reference)
  and sorted by (distance, index).

So the returned indices are those of the reference ranking, and the returned distances
are the accurate ones.

A query may carry a *floor* F (a search asked only for its neighbours at accurate distance
<= F, as a distributed shard is once the home shard's k-th distance is known): hi_k is then
min(hi_k, F), a candidate dropped with D(a_dropped + E) > F is no contender whatever the
kept ones are, and the row holds the top k of the points within F (padded with -1 and inf),
possibly followed by farther ones. ``floor_thresholds`` turns F into the |rho| below which a
select may drop a candidate (or a pruned node's bound) knowing that this test passes.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._numba_math import accurate_abs_rho, accurate_abs_rho4


@njit(inline="always", cache=True)
def _dist(a):
    """Distance for an |rho| that may lie outside [0, 1] after adding a margin."""
    if a <= 0.0:
        return 1.0
    if a >= 1.0:
        return 0.0
    return math.sqrt(1.0 - a)


@njit(parallel=True, cache=True, fastmath=False)
def certify_and_rank(k, cand_index, cand_a, a_dropped, margin, floor, qx, qv, qp, x, v, p, scale,
                     kernel_id, variance, out_index, out_dist, certified, accurate_evals):
    for r in prange(cand_index.shape[0]):
        kept = 0
        while kept < cand_index.shape[1] and cand_index[r, kept] >= 0:
            kept += 1
        a = cand_a[r, :kept]
        idx = cand_index[r, :kept]
        order = np.argsort(-a, kind="mergesort")
        e = margin[r]
        hi_k = min(_dist(a[order[k - 1]] - e) if kept >= k else np.inf, floor[r])
        if a_dropped[r] >= 0.0 and _dist(a_dropped[r] + e) <= hi_k:
            certified[r] = False
            continue
        certified[r] = True
        n_cont = 0
        while n_cont < kept and _dist(a[order[n_cont]] + e) <= hi_k:
            n_cont += 1
        cont_idx = np.empty(n_cont, dtype=np.int64)
        cont_dist = np.empty(n_cont)
        for c in range(n_cont):
            cont_idx[c] = idx[order[c]]
        # the accurate values four at a time (the same bits as one at a time, faster)
        quads = n_cont - n_cont % 4
        for c in range(0, quads, 4):
            accurate_abs_rho4(qx[r], qv[r], qp[r], x, v, p, cont_idx[c], cont_idx[c + 1], cont_idx[c + 2],
                              cont_idx[c + 3], scale, kernel_id, variance, cont_dist, c)
        for c in range(quads, n_cont):
            j = cont_idx[c]
            cont_dist[c] = accurate_abs_rho(qx[r], qv[r], qp[r], x[j], v[j], p[j], scale, kernel_id, variance)
        for c in range(n_cont):
            cont_dist[c] = math.sqrt(1.0 - cont_dist[c])
        accurate_evals[r] = n_cont
        # equal distances go to the smaller index: stable sort on index first
        by_index = np.argsort(cont_idx, kind="mergesort")
        cont_idx = cont_idx[by_index]
        cont_dist = cont_dist[by_index]
        ranked = np.argsort(cont_dist, kind="mergesort")
        take = min(k, n_cont)
        for c in range(take):
            out_index[r, c] = cont_idx[ranked[c]]
            out_dist[r, c] = cont_dist[ranked[c]]
        for c in range(take, k):
            out_index[r, c] = -1
            out_dist[r, c] = np.inf


@njit(cache=True, fastmath=False)
def floor_thresholds(floor, margin):
    """Per query, the |rho| t with D(a + E) > F for every a < t (F = ``floor``, E = ``margin``),
    as certify_and_rank computes D: a select may drop whatever its fast value or bound puts
    below t. -inf where F is infinite (no floor) or where no a qualifies."""
    out = np.empty(floor.shape[0])
    for r in range(floor.shape[0]):
        f = floor[r]
        if not f < 1.0:  # D <= 1 always: a floor of 1 or more (or inf) drops nothing
            out[r] = -np.inf
            continue
        e = margin[r]
        t = (1.0 - f * f) - e
        # D(a + E) > F must hold at t itself (then for every a < t: D is non-increasing in a);
        # step down past the roundings of 1 - F^2, a + E and the square root
        step = 4.0 * np.finfo(np.float64).eps * max(1.0, abs(t))
        while t > -1.0 and _dist(t + e) <= f:
            t -= step
            step *= 2.0
        out[r] = t if t > -1.0 else -np.inf
    return out
