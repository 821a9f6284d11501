"""Choosing inducing points from the data: seeded kmeans++ (D^2) sampling.

GPBoost seeds its inducing points with kmeans++; we keep the seeding step, which picks
actual data points, so the result is deterministic for a seed and costs O(n m d).
"""

from __future__ import annotations

import numpy as np


def kmeanspp_indices(coords: np.ndarray, m: int, seed: int) -> np.ndarray:
    """Indices of m distinct data points chosen by kmeans++ seeding, in selection order.

    Each new centre is drawn with probability proportional to the squared distance to
    the nearest centre chosen so far. When every remaining point coincides with a centre
    (fewer than m distinct locations) the rest are drawn uniformly from the unchosen points.
    """
    n = coords.shape[0]
    rng = np.random.default_rng(seed)
    chosen = np.empty(m, dtype=np.int64)
    taken = np.zeros(n, dtype=bool)
    chosen[0] = rng.integers(n)
    taken[chosen[0]] = True
    nearest = np.sum((coords - coords[chosen[0]]) ** 2, axis=1)
    for c in range(1, m):
        weights = np.where(taken, 0.0, nearest)
        total = weights.sum()
        if total > 0:
            nxt = int(np.searchsorted(np.cumsum(weights), rng.random() * total, side="right"))
            nxt = min(nxt, n - 1)
            if taken[nxt]:  # only reachable through rounding at the cumsum's end
                nxt = int(np.flatnonzero(~taken)[-1])
        else:
            nxt = int(rng.choice(np.flatnonzero(~taken)))
        chosen[c] = nxt
        taken[nxt] = True
        np.minimum(nearest, np.sum((coords - coords[nxt]) ** 2, axis=1), out=nearest)
    return chosen
