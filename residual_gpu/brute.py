"""Brute force's select pass in the index's precision, on any backend.

float64: the backend's streaming select over every point (backends/base.py).

float32 (docs/precision.md, "The float32 fast pass"): the points split by their residual
variance. Those with ordinary p are streamed by the backend in float32 (V copied to float32
once; single-precision GEMM tiles); the few with tiny p (p < precision.tiny_p_cut: the
inducing points and their immediate neighbours), whose 1/sqrt(p) would widen every query's
float32 margin, are streamed in float64. The two selects' candidates are merged per query
(the ``keep`` largest fast values; whatever the merge leaves out raises the dropped
maximum), with the margin float64's E_i plus float32's (precision.float32_margins, maxima over
the float32 candidates). Queries whose own float32 margin exceeds FLOAT32_MAX_MARGIN (tiny p
themselves) take the float64 select over every point. Certification and the accurate
re-ranking are the float64 path's, so the answers are the same bits in either precision.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .backends import Candidates, QueryBatch
from .backends.cpu import heap_offer
from .precision import FLOAT32_MAX_MARGIN, candidate_maxima, float32_margins, query_margins, tiny_p_cut
from .problem import ProblemView


class _Part:
    """One share of the candidates (ascending dataset indices ``ids``) prepared on the backend."""

    def __init__(self, backend, problem, ids: np.ndarray, v_dtype):
        self.ids = ids
        self.dtype = np.dtype(v_dtype)
        self.prepared = backend.prepare(ProblemView(problem, ids, v_dtype)) if ids.size else None

    def local(self, batch: QueryBatch) -> QueryBatch:
        """The batch with limits and self indices in this part's local numbering."""
        limit = np.searchsorted(self.ids, batch.limit, side="left").astype(np.int64)
        pos = np.searchsorted(self.ids, batch.self_index)
        hit = (batch.self_index >= 0) & (pos < self.ids.size)
        hit[hit] = self.ids[pos[hit]] == batch.self_index[hit]
        return QueryBatch(batch.coords, np.ascontiguousarray(batch.v, dtype=self.dtype), batch.p, batch.v_norms,
                          np.where(hit, pos, -1).astype(np.int64), limit)


class BruteSelect:
    """``select(batch, keep) -> Candidates`` of brute force in float64 or float32 on ``backend``."""

    def __init__(self, backend, prepared, problem, precision: str):
        if precision not in ("float64", "float32"):
            raise ValueError(f"precision must be 'float64' or 'float32' here, got {precision!r}")
        self.backend = backend
        self.prepared = prepared  # the float64 problem, every point
        self.problem = problem
        self.precision = precision
        self._max64 = candidate_maxima(problem.v_norms, problem.p)  # search.exact_knn's
        self._parts = None
        if precision == "float32":
            self._tiny = problem.p < tiny_p_cut(problem.p)
            self._max32 = candidate_maxima(problem.v_norms[~self._tiny], problem.p[~self._tiny])

    @property
    def fast(self) -> _Part:
        """The float32 share of the candidates (prepared on first use: the tree never needs it)."""
        return self._split()[0]

    @property
    def slow(self) -> _Part:
        """The float64 share: the points with tiny p."""
        return self._split()[1]

    def _split(self) -> tuple[_Part, _Part]:
        if self._parts is None:
            ids = np.arange(self.problem.n, dtype=np.int64)
            self._parts = (_Part(self.backend, self.problem, ids[~self._tiny], np.float32),
                           _Part(self.backend, self.problem, ids[self._tiny], np.float64))
        return self._parts

    def float32_margins(self, batch: QueryBatch) -> np.ndarray:
        """What the float32 pass adds to each query's margin (maxima over its float32 candidates)."""
        prob = self.problem
        return float32_margins(batch.v_norms, batch.p, *self._max32, prob.m, prob.d, prob.kernel.variance)

    def __call__(self, batch: QueryBatch, keep: int) -> Candidates:
        if self.precision == "float64" or not np.any(~self._tiny):
            return self.backend.select_candidates(self.prepared, batch, keep)
        prob = self.problem
        e64 = query_margins(batch.v_norms, batch.p, *self._max64, prob.m, prob.d, prob.kernel.variance)
        e32 = self.float32_margins(batch)
        wide = e32 > FLOAT32_MAX_MARGIN
        q = batch.size
        index = np.full((q, keep), -1, dtype=np.int64)
        abs_rho = np.full((q, keep), -1.0)
        a_dropped = np.full(q, -1.0)
        evaluations = 0
        if wide.any():
            rows = np.flatnonzero(wide)
            cand = self.backend.select_candidates(self.prepared, batch.take(rows), keep)
            index[rows], abs_rho[rows], a_dropped[rows] = cand.index, cand.abs_rho, cand.a_dropped
            evaluations += cand.evaluations
        rows = np.flatnonzero(~wide)
        if rows.size:
            sub = batch.take(rows) if rows.size < q else batch
            parts = [(part, self.backend.select_candidates(part.prepared, part.local(sub), keep))
                     for part in (self.fast, self.slow) if part.ids.size]
            merged = _merge(parts, keep)
            index[rows], abs_rho[rows], a_dropped[rows] = merged
            evaluations += sum(c.evaluations for _, c in parts)
        return Candidates(index=index, abs_rho=abs_rho, a_dropped=a_dropped, evaluations=int(evaluations),
                          margin=e64 + np.where(wide, 0.0, e32))


def _merge(parts, keep: int):
    """merge_candidates over the parts' candidates, their indices made global (part.ids)."""
    return merge_candidates([Candidates(np.where(c.index >= 0, part.ids[np.maximum(c.index, 0)], -1), c.abs_rho,
                                        c.a_dropped, c.evaluations) for part, c in parts], keep)


def merge_candidates(cands, keep: int):
    """(heap_i, heap_a, dropped): the ``keep`` largest kept values per row over candidate sets in
    one numbering, and the dropped maximum: every set's, and whatever the merge leaves out."""
    idx = np.concatenate([c.index for c in cands], axis=1)
    val = np.concatenate([c.abs_rho for c in cands], axis=1)
    dropped = np.max(np.stack([c.a_dropped for c in cands]), axis=0)
    heap_a = np.full((idx.shape[0], keep), -1.0)
    heap_i = np.full((idx.shape[0], keep), -1, dtype=np.int64)
    _merge_rows(idx, val, heap_a, heap_i, dropped)
    return heap_i, heap_a, dropped


@njit(cache=True, fastmath=False)
def _merge_rows(idx, val, heap_a, heap_i, dropped):
    """Per row, every kept candidate (idx >= 0) into a bounded min-heap of the largest values, as
    the backends' select folds them: whatever leaves the heap or never enters raises dropped."""
    keep = heap_a.shape[1]
    for r in range(idx.shape[0]):
        size = 0
        top_dropped = dropped[r]
        for c in range(idx.shape[1]):
            if idx[r, c] >= 0:
                size, top_dropped = heap_offer(heap_a[r], heap_i[r], size, keep, top_dropped, val[r, c], idx[r, c])
        dropped[r] = top_dropped
