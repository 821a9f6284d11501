"""The backend protocol: what every compute backend (cpu, cuda, jax) provides.

A backend copies a ResidualProblem (or a ProblemView of some of its points) to its device
once (``prepare``) and then answers two kinds of block request, both in the fast path, whose
V products run in the precision of the prepared V (float64, or float32 for a float32 fast
pass: residual_gpu/brute.py) and whose values are float64:

- ``abs_rho_tile``: dense |rho| for a tile of queries against given candidate indices
  (the unit the search tree evaluates at its leaves);
- ``select_candidates``: a streaming select over candidate tiles that keeps, per query,
  the ``keep`` admissible candidates of largest fast |rho| and the largest fast |rho| it
  dropped, never materialising more than one tile.

Certification against rounding error and the exact re-ranking happen on the host
(``residual_gpu.certify``), identically for every backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QueryBatch:
    """Queries in factor form, whatever kind they came from.

    coords (q, d), v (q, m), p (q,) and v_norms (q,) describe each query point;
    ``self_index`` is its dataset index (excluded from its own neighbours) or -1 for a
    new location; candidate j is admissible for query r only if j < ``limit[r]``
    (n outside predecessor mode) and j != self_index[r]. ``floor`` (q,), when set: per query,
    the accurate distance beyond which no neighbour is wanted (certify.py; a distributed
    shard's search below the home shard's k-th distance); None: no floor.
    """

    coords: np.ndarray
    v: np.ndarray
    p: np.ndarray
    v_norms: np.ndarray
    self_index: np.ndarray
    limit: np.ndarray
    floor: np.ndarray | None = None

    @property
    def size(self) -> int:
        return self.coords.shape[0]

    def take(self, rows: np.ndarray) -> QueryBatch:
        return QueryBatch(*(np.ascontiguousarray(a[rows]) for a in (
            self.coords, self.v, self.p, self.v_norms, self.self_index, self.limit)),
                          floor=None if self.floor is None else np.ascontiguousarray(self.floor[rows]))


@dataclass
class Candidates:
    """Result of ``select_candidates``: per query, kept candidate indices and fast |rho|.

    ``index`` (q, keep) holds -1 where fewer than ``keep`` admissible candidates exist
    (the kept ones first: certification reads each row up to its first -1; the caller
    never asks for keep = 0);
    ``a_dropped`` (q,) is the largest fast |rho| of an admissible candidate that was not
    kept (-1 when none was dropped); ``evaluations`` counts admissible pairs evaluated.
    ``margin`` (q,), when set, is the per-query rounding margin (precision.query_margins)
    that covers these fast values, for selects whose arithmetic is not the float64 path (the
    tree's float32 leaf blocks); None means the problem-wide float64 margin.
    """

    index: np.ndarray
    abs_rho: np.ndarray
    a_dropped: np.ndarray
    evaluations: int
    margin: np.ndarray | None = None


class Backend(ABC):
    """One compute backend; instances are cheap and hold no device state."""

    name: str = ""

    @classmethod
    @abstractmethod
    def availability(cls) -> tuple[bool, str]:
        """(usable here, reason) without side effects beyond importing its library."""

    @abstractmethod
    def prepare(self, problem):
        """Copy the problem's arrays to the device; returns an opaque handle."""

    @abstractmethod
    def abs_rho_tile(self, prepared, batch: QueryBatch, cols: np.ndarray) -> np.ndarray:
        """Fast |rho| (clamped to [0, 1]) of every query against dataset points ``cols``."""

    @abstractmethod
    def select_candidates(self, prepared, batch: QueryBatch, keep: int) -> Candidates:
        """Stream all candidates j < max(limit) and keep the ``keep`` largest per query."""

    def cross_factors(self, chol, inducing, coords, kernel, p_floor):
        """(V, p, ||V_i||) of coordinates (q, d) for the Cholesky factor ``chol`` of K(U, U) +
        jitter I, as numpy arrays: ``_linalg.cross_factors`` on the host unless the backend builds
        them on its device, where they must be the same bits (the problem's factors do not depend
        on where they were built)."""
        from .._linalg import cross_factors

        return cross_factors(chol, inducing, coords, kernel, p_floor)

    def describe(self) -> str:
        return self.name
