"""Spatial shards of the points: a kd split of the coordinates into P parts, Hilbert-ordered.

Each shard is a set of dataset indices (ascending), so a shard's local index order is the
global order restricted to it: a global predecessor limit i becomes the local limit
``searchsorted(rows, i)``, and ties broken by local index are ties broken by global index.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgumentError
from ..hilbert import hilbert_order


def kd_shards(scaled: np.ndarray, parts: int) -> list[np.ndarray]:
    """``parts`` arrays of ascending row indices of ``scaled`` (coordinates divided by the
    lengthscales): a kd split that cuts the widest dimension at the point count proportional
    to the parts on each side, so shard sizes differ by at most one; the shards come in
    Hilbert order of their centres, so neighbouring shards are neighbours in the list."""
    n = scaled.shape[0]
    if not 1 <= parts <= n:
        raise InvalidArgumentError(f"shards must be in [1, {n}] (every shard needs at least one point), "
                                   f"got shards={parts!r}")
    out = []
    stack = [(np.arange(n, dtype=np.int64), parts)]
    while stack:
        idx, k = stack.pop()
        if k == 1:
            out.append(idx)
            continue
        x = scaled[idx]
        t = int(np.argmax(x.max(axis=0) - x.min(axis=0)))
        order = np.argsort(x[:, t], kind="stable")  # idx ascending: equal coordinates stay in index order
        left = k // 2
        cut = (idx.size * left) // k
        stack.append((np.sort(idx[order[cut:]]), k - left))
        stack.append((np.sort(idx[order[:cut]]), left))
    centres = np.array([scaled[rows].mean(axis=0) for rows in out])
    lo, hi = scaled.min(axis=0), scaled.max(axis=0)
    return [out[s] for s in hilbert_order(centres, lo, hi)]


def nearest_box(scaled_q: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """For each query row, the shard whose (scaled) coordinate box is nearest (the first on ties):
    the home shard of a new location. Any choice is exact; a near one prunes the others best."""
    gap = np.maximum(np.maximum(lo[None] - scaled_q[:, None], scaled_q[:, None] - hi[None]), 0.0)
    return np.argmin(np.sum(gap * gap, axis=2), axis=1)
