"""The backend protocol: what every compute backend (cpu, cuda, jax) provides.

A backend copies a ResidualProblem (or a ProblemView of some of its points) to its device
once (``prepare``) and then answers two kinds of block request, both in the fast path, whose
V products run in the precision of the prepared V (float64, or float32 for a float32 fast
pass: residual_gpu/brute.py) and whose values are float64:

- ``abs_rho_tile``: dense |rho| for a tile of queries against given candidate indices
  (the unit the search tree evaluates at its leaves);
- ``select_candidates``: a streaming select over candidate tiles that keeps, per query,
  the ``keep`` admissible candidates of largest fast |rho| and the largest fast |rho| it
  dropped, never materialising more than one tile;
- ``select_blocks``: the same select over given column ranges per query tile (the search
  tree's leaf blocks: residual_gpu/tree/schedule.py), and ``bound_products``, the two GEMMs of
  the tree's node bound (a_q . mid, |a_q| . rad) against node summaries ``prepare_bounds``
  copied to the device once.

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


@dataclass(frozen=True)
class BlockList:
    """Which columns each query tile evaluates in ``select_blocks``.

    Tile t is the batch rows row_ptr[t]:row_ptr[t + 1] and the column ranges
    starts[s]:ends[s] for s in range_ptr[t]:range_ptr[t + 1] (positions in the prepared
    points); ``ids`` (n_prepared,) holds each position's dataset index, which admissibility
    (ids[j] < limit, ids[j] != self_index) and the returned candidates use. Range s may name
    the only rows it needs, range_rows[range_rows_ptr[s]:range_rows_ptr[s + 1]] (rows of its
    tile, ascending); a backend may evaluate the whole tile instead (more values never change
    the select's contract), as the default implementation does.
    """

    row_ptr: np.ndarray
    range_ptr: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    ids: np.ndarray
    range_rows_ptr: np.ndarray | None = None
    range_rows: np.ndarray | None = None

    @property
    def tiles(self) -> int:
        return self.row_ptr.size - 1

    def row_lists(self) -> tuple[np.ndarray, np.ndarray]:
        """(range_rows_ptr, range_rows), with every range taking its whole tile where none were named."""
        if self.range_rows_ptr is not None:
            return self.range_rows_ptr, self.range_rows
        tile = np.repeat(np.arange(self.tiles), np.diff(self.range_ptr))  # each range's tile
        rows = [np.arange(self.row_ptr[t], self.row_ptr[t + 1], dtype=np.int64) for t in tile]
        ptr = np.zeros(tile.size + 1, dtype=np.int64)
        np.cumsum([r.size for r in rows], out=ptr[1:])
        return ptr, np.concatenate(rows) if rows else np.zeros(0, np.int64)

    def columns(self, t: int) -> np.ndarray:
        """Tile t's positions, range by range."""
        s0, s1 = self.range_ptr[t], self.range_ptr[t + 1]
        if s1 == s0:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in zip(self.starts[s0:s1], self.ends[s0:s1])])


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

    def select_blocks(self, prepared, batch: QueryBatch, keep: int, blocks: BlockList) -> Candidates:
        """``select_candidates`` restricted to ``blocks``: tile t's rows against the prepared points
        in its column ranges, admissible where ids[j] < limit and ids[j] != self_index; the
        returned indices are ids. This default evaluates each tile with ``abs_rho_tile`` and folds
        it on the host; a backend may fuse both."""
        from .cpu import fold_block_values, select_state

        heap_a, heap_i, count, a_dropped, _ = select_state(batch.size, keep)
        evaluations = 0
        for t in range(blocks.tiles):
            r0, r1 = int(blocks.row_ptr[t]), int(blocks.row_ptr[t + 1])
            cols = blocks.columns(t)
            if r1 == r0 or cols.size == 0:
                continue
            rows = np.arange(r0, r1)
            vals = self.abs_rho_tile(prepared, batch.take(rows), cols)
            evaluations += fold_block_values(np.ascontiguousarray(vals, dtype=np.float64), blocks.ids[cols],
                                             batch.limit[r0:r1], batch.self_index[r0:r1], heap_a[r0:r1],
                                             heap_i[r0:r1], count[r0:r1], a_dropped[r0:r1])
        return Candidates(index=heap_i, abs_rho=heap_a, a_dropped=a_dropped, evaluations=int(evaluations))

    def prepare_bounds(self, mid: np.ndarray, rad: np.ndarray):
        """Node summaries (nodes, m) of the tree's bound, copied to the device once (their dtype,
        float32 or float64, is the products' precision)."""
        return np.ascontiguousarray(mid), np.ascontiguousarray(rad)

    def bound_products(self, prepared_bounds, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(a @ mid.T, |a| @ rad.T) as float64 host arrays (q, nodes), multiplied in the summaries'
        precision (the bound's gam_prod covers any summation order: no TF32 or bf16)."""
        mid, rad = prepared_bounds
        a = np.ascontiguousarray(a, dtype=mid.dtype)
        return (a @ mid.T).astype(np.float64, copy=False), (np.abs(a) @ rad.T).astype(np.float64, copy=False)

    def cross_factors(self, chol, inducing, coords, kernel, p_floor):
        """(V, p, ||V_i||) of coordinates (q, d) for the Cholesky factor ``chol`` of K(U, U) +
        jitter I, as numpy arrays: ``_linalg.cross_factors`` on the host unless the backend builds
        them on its device, where they must be the same bits (the problem's factors do not depend
        on where they were built)."""
        from .._linalg import cross_factors

        return cross_factors(chol, inducing, coords, kernel, p_floor)

    def describe(self) -> str:
        return self.name
