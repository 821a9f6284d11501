"""Choosing inducing points from the data: seeded kmeans++ (D^2) sampling, and Lloyd's kmeans.

GPBoost seeds its inducing points with kmeans++ and then runs Lloyd iterations. Both are
here, deterministic for a seed, on the unscaled coordinates (ARD lengthscales play no part):

- ``kmeanspp_indices`` (``inducing_method="kmeans++"``, the default): the seeding step alone,
  which picks actual data points, in O(n m d). It runs in Numba and makes exactly the choices
  of 0.1.0's numpy version for the same seed (tests/test_build.py keeps that version as its
  reference): the same random draws in the same order, the squared distances and the
  weights' total summed as numpy sums them (its pairwise summation, reproduced in
  ``_pairwise_sum``), the same cumulative-sum search.
- ``kmeans_centres`` (``inducing_method="kmeans"``): kmeans++ seeding, then Lloyd iterations.

Both square unscaled coordinate differences, as 0.1.0 did: coordinates more than ~1e154 apart
overflow to inf (the problem's spread check bounds distances in lengthscales, not these).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

#: Lloyd iterations at most, after the kmeans++ seeding
KMEANS_MAX_ITER = 20
#: Lloyd stops once the centres moved, in sum of squares, by at most this times the data's mean
#: per-column variance in one iteration (scikit-learn's rule and default)
KMEANS_TOL = 1e-4
#: points per parallel task of the Lloyd assignment
_ROW_CHUNK = 4096


@njit(cache=True, fastmath=False)
def _pairwise_sum(a, lo, n):
    """sum(a[lo:lo + n]) in numpy's pairwise order (numpy/_core/src/umath/loops_utils.h.src,
    ``pairwise_sum``: blocks of at most 128 terms, split in halves rounded to a multiple of 8,
    summed left then right), so that it returns np.sum's bits (tests/test_build.py checks it on
    many lengths). The recursion is unrolled onto a stack: Numba's cache cannot reload a
    parallel function that calls a recursive one."""
    if n <= 128:
        return _pairwise_block(a, lo, n)
    # frames: (start, length, stage: 0 left to do, 1 right to do, 2 both done; left's sum)
    f_lo = np.empty(64, dtype=np.int64)
    f_n = np.empty(64, dtype=np.int64)
    f_stage = np.empty(64, dtype=np.int64)
    f_left = np.empty(64)
    top = 0
    f_lo[0], f_n[0], f_stage[0] = lo, n, 0
    ret = 0.0
    while top >= 0:
        k = f_n[top]
        if k <= 128:
            ret = _pairwise_block(a, f_lo[top], k)
            top -= 1
            continue
        half = k // 2
        half -= half % 8
        stage = f_stage[top]
        f_stage[top] = stage + 1
        if stage == 0:
            f_lo[top + 1], f_n[top + 1], f_stage[top + 1] = f_lo[top], half, 0
            top += 1
        elif stage == 1:
            f_left[top] = ret
            f_lo[top + 1], f_n[top + 1], f_stage[top + 1] = f_lo[top] + half, k - half, 0
            top += 1
        else:
            ret = f_left[top] + ret
            top -= 1
    return ret


@njit(inline="always", cache=True)
def _pairwise_block(a, lo, n):
    """numpy's pairwise_sum for n <= 128: a plain loop below 8 terms, else 8 accumulators."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[lo + i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    while i < n - n % 8:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@njit(cache=True, fastmath=False)
def _update_nearest(coords, centre, taken, nearest, weights, first):
    """nearest = min(nearest, ||x_i - c||^2) (or = on the first centre) with numpy's
    ``np.sum((coords - c) ** 2, axis=1)`` bits; weights = where(taken, 0, nearest); returns
    weights.sum() with numpy's bits. One thread: O(n d) per centre is too little work to pay for
    a parallel launch on a busy machine (measured 20x slower with 2 threads on 2 loaded cores)."""
    n, d = coords.shape
    c = coords[centre]
    sq = np.empty(d)
    for i in range(n):
        s = 0.0
        if d < 8:  # numpy's pairwise sum is a plain loop there; no call per row
            for t in range(d):
                diff = coords[i, t] - c[t]
                s += diff * diff
        else:
            for t in range(d):
                diff = coords[i, t] - c[t]
                sq[t] = diff * diff
            s = _pairwise_sum(sq, 0, d)
        if first or s < nearest[i]:
            nearest[i] = s
        weights[i] = 0.0 if taken[i] else nearest[i]
    return _pairwise_sum(weights, 0, n)


@njit(cache=True, fastmath=False)
def _search_cumsum(weights, target):
    """np.searchsorted(np.cumsum(weights), target, side="right"): the first i whose running
    sum exceeds target (n if none), with cumsum's sequential sums."""
    s = 0.0
    for i in range(weights.shape[0]):
        s += weights[i]
        if s > target:
            return i
    return weights.shape[0]


def kmeanspp_indices(coords: np.ndarray, m: int, seed: int) -> np.ndarray:
    """Indices of m distinct data points chosen by kmeans++ seeding, in selection order.

    Each new centre is drawn with probability proportional to the squared distance to
    the nearest centre chosen so far. When every remaining point coincides with a centre
    (fewer than m distinct locations) the rest are drawn uniformly from the unchosen points.
    """
    coords = np.ascontiguousarray(coords, dtype=np.float64)
    n = coords.shape[0]
    rng = np.random.default_rng(seed)
    chosen = np.empty(m, dtype=np.int64)
    taken = np.zeros(n, dtype=bool)
    nearest = np.empty(n)
    weights = np.empty(n)
    nxt = int(rng.integers(n))
    total = 0.0
    for c in range(m):
        if c:
            if total > 0:
                nxt = min(_search_cumsum(weights, rng.random() * total), n - 1)
                if taken[nxt]:  # only reachable through rounding at the cumsum's end
                    nxt = int(np.flatnonzero(~taken)[-1])
            else:
                nxt = int(rng.choice(np.flatnonzero(~taken)))
        chosen[c] = nxt
        taken[nxt] = True
        total = _update_nearest(coords, nxt, taken, nearest, weights, c == 0)
    return chosen


@njit(parallel=True, cache=True, fastmath=False)
def _assign(coords, centres_t, labels, dist):
    """Each point's nearest centre (squared distance, ties to the smaller centre index); the
    centres transposed (d, m), so the loop across them vectorises."""
    n, d = coords.shape
    m = centres_t.shape[1]
    for chunk in prange((n + _ROW_CHUNK - 1) // _ROW_CHUNK):
        sq = np.empty(m)
        for i in range(chunk * _ROW_CHUNK, min(n, (chunk + 1) * _ROW_CHUNK)):
            for c in range(m):
                sq[c] = 0.0
            for t in range(d):
                xt = coords[i, t]
                for c in range(m):
                    diff = xt - centres_t[t, c]
                    sq[c] += diff * diff
            arg = 0
            for c in range(1, m):
                if sq[c] < sq[arg]:
                    arg = c
            labels[i] = arg
            dist[i] = sq[arg]


@njit(cache=True, fastmath=False)
def _update_centres(coords, labels, dist, centres):
    """centres <- the mean of their points, summed in index order (one thread: the sums do not
    depend on the thread count). An empty cluster takes the point farthest from its centre
    (ties to the smaller index), each such point used once. Returns the sum of squared moves."""
    n, d = coords.shape
    m = centres.shape[0]
    sums = np.zeros((m, d))
    counts = np.zeros(m, dtype=np.int64)
    for i in range(n):
        counts[labels[i]] += 1
        for t in range(d):
            sums[labels[i], t] += coords[i, t]
    far = dist.copy()
    moved = 0.0
    for c in range(m):
        if counts[c]:
            for t in range(d):
                sums[c, t] /= counts[c]
        else:
            j = np.argmax(far)
            far[j] = -1.0
            for t in range(d):
                sums[c, t] = coords[j, t]
        for t in range(d):
            diff = sums[c, t] - centres[c, t]
            moved += diff * diff
            centres[c, t] = sums[c, t]
    return moved


def kmeans_centres(coords: np.ndarray, m: int, seed: int) -> np.ndarray:
    """m centres (m, d) by kmeans++ seeding (``kmeanspp_indices``) then Lloyd iterations: assign
    every point to its nearest centre, move each centre to its points' mean; at most
    KMEANS_MAX_ITER iterations, fewer once the centres move by at most KMEANS_TOL (see there).
    Deterministic for a seed: whatever the thread count, the same bits."""
    coords = np.ascontiguousarray(coords, dtype=np.float64)
    centres = coords[kmeanspp_indices(coords, m, seed)]
    tol = KMEANS_TOL * float(np.mean(np.var(coords, axis=0)))
    labels = np.empty(coords.shape[0], dtype=np.int64)
    dist = np.empty(coords.shape[0])
    for _ in range(KMEANS_MAX_ITER):
        _assign(coords, np.ascontiguousarray(centres.T), labels, dist)
        if _update_centres(coords, labels, dist, centres) <= tol:
            break
    return centres
