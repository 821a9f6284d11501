"""Hilbert-curve keys: an ordering of points in which neighbours on the curve are close in space.

The tree search groups queries into tiles of consecutive queries in Hilbert order, so that a
tile is spatially compact and its queries share most of their search frontier.

Keys follow J. Skilling, "Programming the Hilbert curve" (AIP Conf. Proc. 707, 2004):
coordinates are quantised to ``bits`` bits per dimension on a fixed box, transformed to the
"transposed" Hilbert index in place, and the transposed form's bits are interleaved (most
significant bit of dimension 0 first) into one integer. ``bits = min(16, 62 // d)`` keeps the
key in a non-negative int64. docs/tree.md gives the exact arithmetic (a Rust port reproduces
the same keys).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


def key_bits(d: int) -> int:
    """Bits per dimension of a key for d-dimensional points."""
    return max(1, min(16, 62 // max(d, 1)))


@njit(inline="always", cache=True)
def _transpose_key(cells, bits):
    """Skilling's AxesToTranspose on ``cells`` (modified in place), then bit interleaving."""
    n = cells.shape[0]
    top = np.int64(1) << (bits - 1)
    q = top
    while q > 1:
        p = q - 1
        for i in range(n):
            if cells[i] & q:
                cells[0] ^= p
            else:
                t = (cells[0] ^ cells[i]) & p
                cells[0] ^= t
                cells[i] ^= t
        q >>= 1
    for i in range(1, n):
        cells[i] ^= cells[i - 1]
    t = np.int64(0)
    q = top
    while q > 1:
        if cells[n - 1] & q:
            t ^= q - 1
        q >>= 1
    for i in range(n):
        cells[i] ^= t
    key = np.int64(0)
    for b in range(bits - 1, -1, -1):
        for i in range(n):
            key = (key << 1) | ((cells[i] >> b) & 1)
    return key


@njit(parallel=True, cache=True, fastmath=False)
def _hilbert_keys(x, lo, width, bits):
    n, d = x.shape
    out = np.empty(n, dtype=np.int64)
    top = (np.int64(1) << bits) - 1
    for i in prange(n):
        cells = np.empty(d, dtype=np.int64)
        for t in range(d):
            c = 0.0 if width[t] <= 0.0 else (x[i, t] - lo[t]) / width[t] * (top + 1)
            ci = np.int64(c) if c > 0.0 else np.int64(0)
            cells[t] = min(top, ci)
        out[i] = _transpose_key(cells, bits)
    return out


def hilbert_keys(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int | None = None) -> np.ndarray:
    """int64 Hilbert keys of the rows of x (n, d) on the box [lo, hi] (points outside are clamped)."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    d = x.shape[1]
    bits = key_bits(d) if bits is None else int(bits)
    lo = np.ascontiguousarray(lo, dtype=np.float64)
    width = np.ascontiguousarray(hi, dtype=np.float64) - lo
    return _hilbert_keys(x, lo, width, bits)


def hilbert_order(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Row order along the Hilbert curve; equal keys keep their row order (stable)."""
    return np.argsort(hilbert_keys(x, lo, hi), kind="stable")
