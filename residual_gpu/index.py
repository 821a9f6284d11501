"""Public search API: ResidualIndex, KnnResult and the one-call ``residual_knn``."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ._validation import _describe, as_index_array, as_int
from .backends import QueryBatch, get_backend
from .errors import InvalidArgumentError, InvalidTypeError
from .kernels import Kernel
from .problem import ResidualProblem
from .search import exact_knn
from .telemetry import Telemetry

METHODS = ("auto", "brute")


@dataclass
class KnnResult:
    """indices (q, k) int64 and distances (q, k) float64, ascending, ties to the smaller index.

    Rows with fewer than k admissible neighbours are padded with index -1 and distance inf.
    """

    indices: np.ndarray
    distances: np.ndarray
    telemetry: Telemetry

    def __iter__(self):
        return iter((self.indices, self.distances))


class ResidualIndex:
    """A residual-correlation neighbour index over one ResidualProblem.

    ``backend`` ("auto", "cpu", "cuda", "jax") is resolved once here and kept in
    ``self.backend``; ``method`` ("auto", "brute") likewise in ``self.method``.
    """

    def __init__(self, problem: ResidualProblem, backend: str = "auto", method: str = "auto"):
        if not isinstance(problem, ResidualProblem):
            raise InvalidTypeError(f"problem must be a ResidualProblem, got problem={_describe(problem)}")
        if not isinstance(method, str):
            raise InvalidTypeError(f"method must be a string, got method={method!r}")
        if method not in METHODS:
            raise InvalidArgumentError(f"method must be one of {list(METHODS)}, got method={method!r}")
        self.problem = problem
        self._backend = get_backend(backend)
        self.backend = self._backend.name
        # Only brute force exists so far; "auto" resolves to it.
        self.method = "brute"
        t0 = time.perf_counter()
        self._prepared = self._backend.prepare(problem)
        self.build_seconds = time.perf_counter() - t0

    def _batch(self, queries, query_coords, predecessor: bool) -> QueryBatch:
        prob = self.problem
        if query_coords is not None:
            if queries is not None:
                raise InvalidArgumentError("pass either queries= (dataset indices) or query_coords= (new locations), not both")
            if predecessor:
                raise InvalidArgumentError("predecessor=True needs dataset queries; new locations (query_coords) have no order")
            xq, vq, pq = prob.factors_at(query_coords)
            q = xq.shape[0]
            return QueryBatch(xq, vq, pq, np.sqrt(np.einsum("ij,ij->i", vq, vq)),
                              np.full(q, -1, dtype=np.int64), np.full(q, prob.n, dtype=np.int64))
        ids = np.arange(prob.n, dtype=np.int64) if queries is None else as_index_array(queries, "queries", n=prob.n)
        limit = ids.copy() if predecessor else np.full(ids.size, prob.n, dtype=np.int64)
        return QueryBatch(prob.coords[ids], prob.v[ids], prob.p[ids], prob.v_norms[ids], ids, limit)

    def query(self, k: int, *, queries=None, query_coords=None, predecessor: bool = False,
              progress: bool | None = None) -> KnnResult:
        """The k nearest neighbours in residual distance d = sqrt(1 - |rho|).

        queries: dataset indices (default: every point); query_coords: new locations (q, d).
        predecessor: neighbours of dataset point i restricted to j < i (Vecchia ordering).
        """
        if not isinstance(predecessor, (bool, np.bool_)):
            raise InvalidTypeError(f"predecessor must be a bool, got predecessor={predecessor!r}")
        batch = self._batch(queries, query_coords, bool(predecessor))
        most = self.problem.n if query_coords is not None else self.problem.n - 1
        # In predecessor mode early rows have fewer than k admissible points and are padded,
        # but no row can ever have more than n - 1.
        k = as_int(k, "k", low=1, high=most)
        telemetry = Telemetry(method=self.method, backend=self.backend, queries=batch.size, k=k,
                              predecessor=bool(predecessor))
        t0 = time.perf_counter()
        def select(sub, keep):
            return self._backend.select_candidates(self._prepared, sub, keep)

        idx, dist = exact_knn(select, self.problem, batch, k, telemetry, progress)
        telemetry.add_seconds("query", time.perf_counter() - t0)
        return KnnResult(idx, dist, telemetry)

    def __repr__(self) -> str:
        return f"ResidualIndex({self.problem!r}, backend={self.backend!r}, method={self.method!r})"


def residual_knn(coords, k: int, kernel: Kernel, inducing=256, predecessor: bool = False, queries=None,
                 query_coords=None, backend: str = "auto", method: str = "auto", seed: int = 0,
                 progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One call: build the problem and index, return (indices, distances)."""
    problem = ResidualProblem(coords, kernel=kernel, inducing=inducing, seed=seed)
    index = ResidualIndex(problem, backend=backend, method=method)
    res = index.query(k, queries=queries, query_coords=query_coords, predecessor=predecessor, progress=progress)
    return res.indices, res.distances
