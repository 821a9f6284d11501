"""The neighbour graph of a kNN result as scipy.sparse CSR arrays.

``neighbour_graph``: queries x points, the residual distances as the stored values; the
Vecchia pattern: the n x n lower-triangular sparsity of the Vecchia factor, each row i holding
i and its predecessor neighbours. Padding (index -1 of rows with fewer than k admissible
points) is dropped; a distance of exactly 0.0 (|rho| = 1, e.g. duplicate points) stays a
stored entry, so the pattern is ``graph.indices``, never ``graph != 0`` (and scipy's
``eliminate_zeros`` would drop such neighbours).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse


def _rows(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kept mask, CSR row pointer) of a padded (q, k) index array: padding is every -1."""
    kept = indices >= 0
    indptr = np.zeros(indices.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.count_nonzero(kept, axis=1), out=indptr[1:])
    return kept, indptr


def neighbour_graph(indices: np.ndarray, distances: np.ndarray, n_points: int) -> scipy.sparse.csr_array:
    """(q, n_points) CSR: entry (r, j) the distance from query r to its neighbour j, columns
    ascending in each row."""
    kept, indptr = _rows(indices)
    graph = scipy.sparse.csr_array((distances[kept], indices[kept], indptr), shape=(indices.shape[0], n_points))
    graph.sort_indices()  # rows come ranked by distance; canonical CSR has ascending columns
    return graph


def vecchia_pattern(indices: np.ndarray) -> scipy.sparse.csr_array:
    """(n, n) boolean CSR of an all-points predecessor result: row i holds i and its neighbours
    (all j < i), so the pattern is lower triangular with a full diagonal."""
    n = indices.shape[0]
    with_self = np.concatenate([indices, np.arange(n, dtype=np.int64)[:, None]], axis=1)
    kept, indptr = _rows(with_self)
    pattern = scipy.sparse.csr_array((np.ones(int(indptr[-1]), dtype=bool), with_self[kept], indptr), shape=(n, n))
    pattern.sort_indices()
    return pattern
