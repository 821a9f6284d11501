"""The pure functions the workers run: build a shard, search a chunk on its home shard, search
it on another shard (after pruning), and merge the per-shard top-k lists.

Every function is a pure function of its arguments (no clock, no global state), so that the
engine's retries and its recomputation of a lost shard give the same bits. No dask import here.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numba
import numpy as np

from .._numba_math import row_norms
from ..index import ResidualIndex
from ..problem import ResidualProblem
from .bounds import ShardSummary, prunable, shard_bounds, summarize


@contextmanager
def _threads(threads: int):
    """Numba's threads for this task: the worker's share of the cores (dask limits BLAS and
    OpenMP to its threads per worker, not Numba, whose pool would otherwise oversubscribe the
    machine once per worker process). Answers do not depend on it."""
    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(before)


class Shard:
    """One shard as its worker holds it: the ascending global indices ``rows``, the ResidualIndex
    over its own problem (V_shard = L^-1 K(U, X_shard): bitwise the global V rows, since V is
    computed per row in a fixed order) and the pruning summary. Pickled, it travels as the
    arguments that build it, never as its arrays."""

    def __init__(self, args: tuple, rows: np.ndarray, index: ResidualIndex, summary: ShardSummary):
        self._args = args
        self.rows = rows
        self.index = index
        self.summary = summary

    @property
    def n(self) -> int:
        return self.rows.size

    def __reduce__(self):
        return build_shard, self._args

    def nbytes(self) -> int:
        """Bytes of the shard's problem arrays (coords, V, p): what scales as 1/P."""
        prob = self.index.problem
        return int(prob.coords.nbytes + prob.v.nbytes + prob.p.nbytes + prob.v_norms.nbytes)

    def __sizeof__(self) -> int:
        # what dask's scheduler weighs when it places a task: tasks go to the shard, not the
        # shard (rebuilt from its arguments when moved) to the task
        return 2 * self.nbytes()


def build_shard(coords, rows, kernel, inducing, jitter, p_floor, index_options: dict, leaves: int,
                threads: int = 1) -> Shard:
    """The shard's problem from the inducing points (L computed here, in the same fixed order as
    the single process), its index and its cut-node summary."""
    args = (coords, rows, kernel, inducing, jitter, p_floor, index_options, leaves, threads)
    with _threads(threads):
        problem = ResidualProblem(coords, kernel=kernel, inducing=inducing, jitter=jitter, p_floor=p_floor,
                                  backend=index_options.get("backend"))
        index = ResidualIndex(problem, progress=False, **index_options)
        return Shard(args, rows, index, summarize(problem, rows, leaves))


def plan(shard: Shard, pairs: int, threads: int = 1) -> str:
    """Let the shard's method="auto" count the ``pairs`` of a query batch's chunks before they
    come (ResidualIndex.expect); returns the method they will use."""
    with _threads(threads):
        return shard.index.expect(pairs, progress=False)


@dataclass
class Chunk:
    """A chunk's queries in factor form with their home shard's answer: ``ids`` global dataset
    indices (-1 for new locations), ``limit`` global limits (n outside predecessor mode), and the
    home top-k (global indices, accurate distances, padded with -1 and inf to k columns)."""

    coords: np.ndarray
    v: np.ndarray
    p: np.ndarray
    ids: np.ndarray
    limit: np.ndarray
    indices: np.ndarray
    distances: np.ndarray
    evaluations: int = 0
    method: str = ""

    def __sizeof__(self) -> int:  # dask's memory accounting and task placement read it
        return sum(a.nbytes for a in (self.coords, self.v, self.p, self.ids, self.limit, self.indices, self.distances))


@dataclass
class Part:
    """Another shard's answer for a chunk: the chunk rows it searched and their top-k there."""

    rows: np.ndarray
    indices: np.ndarray
    distances: np.ndarray
    evaluations: int = 0
    method: str = ""

    def __sizeof__(self) -> int:
        return self.rows.nbytes + self.indices.nbytes + self.distances.nbytes


def _top(shard: Shard, k: int, coords, v, p, self_local, limit_local, floor=None
         ) -> tuple[np.ndarray, np.ndarray, int]:
    """Top-k on one shard in global indices, k columns (shards smaller than k pad), the search's
    distance evaluations and method; with ``floor``, the top k within it (query_from_factors)."""
    res = shard.index.query_from_factors(min(k, shard.n), coords, v, p, self_index=self_local, limit=limit_local,
                                         floor=floor)
    idx = np.where(res.indices >= 0, shard.rows[np.maximum(res.indices, 0)], -1)
    pad = k - idx.shape[1]
    return (np.pad(idx, ((0, 0), (0, pad)), constant_values=-1),
            np.pad(res.distances, ((0, 0), (0, pad)), constant_values=np.inf), res.telemetry.distance_evaluations,
            res.telemetry.method)


def search_home(shard: Shard, k: int, n: int, predecessor: bool, ids=None, factors=None, threads: int = 1) -> Chunk:
    """The chunk on its home shard: dataset queries ``ids`` (global, all on this shard; their
    factors are this shard's rows) or new locations given as ``factors`` (coords, V, p)."""
    with _threads(threads):
        return _search_home(shard, k, n, predecessor, ids, factors)


def _search_home(shard: Shard, k: int, n: int, predecessor: bool, ids, factors) -> Chunk:
    if ids is not None:
        local = np.searchsorted(shard.rows, ids)
        prob = shard.index.problem
        coords, v, p = prob.coords[local], prob.v[local], prob.p[local]
        limit = ids.copy() if predecessor else np.full(ids.size, n, dtype=np.int64)
        idx, dist, evals, method = _top(shard, k, coords, v, p, local, local if predecessor else None)
    else:
        coords, v, p = factors
        ids = np.full(coords.shape[0], -1, dtype=np.int64)
        limit = np.full(coords.shape[0], n, dtype=np.int64)
        idx, dist, evals, method = _top(shard, k, coords, v, p, None, None)
    return Chunk(coords, v, p, ids, limit, idx, dist, evals, method)


def search_other(shard: Shard, chunk: Chunk, k: int, threads: int = 1) -> Part:
    """The chunk on a shard that does not hold its queries: only the queries with an admissible
    point here that the shard bound cannot prune (bounds.prunable) are searched, each for its
    top k within the home k-th distance (the floor: a point beyond it cannot enter the merged
    top k, whose home list already holds k points within it)."""
    with _threads(threads):
        return _search_other(shard, chunk, k)


def _search_other(shard: Shard, chunk: Chunk, k: int) -> Part:
    admissible = np.flatnonzero(shard.rows[0] < chunk.limit)
    rows = admissible
    if admissible.size:
        sub = lambda a: a[admissible]
        bound = shard_bounds(shard.summary, sub(chunk.coords), sub(chunk.v), sub(chunk.p), sub(chunk.limit))
        pruned = prunable(bound, shard.summary, row_norms(sub(chunk.v)), sub(chunk.p), sub(chunk.distances)[:, -1])
        rows = admissible[~pruned]
    if not rows.size:
        return Part(rows, np.empty((0, k), dtype=np.int64), np.empty((0, k)))
    local_limit = np.searchsorted(shard.rows, chunk.limit[rows], side="left")
    idx, dist, evals, method = _top(shard, k, chunk.coords[rows], chunk.v[rows], chunk.p[rows], None, local_limit,
                                    chunk.distances[rows, -1])
    return Part(rows, idx, dist, evals, method)


def merge(k: int, chunk: Chunk, parts: list[Part]) -> tuple[np.ndarray, np.ndarray]:
    """The global top k of each query from the home list and the other shards' lists, by
    (accurate distance, global index): the single-process ranking, bit for bit."""
    q = chunk.indices.shape[0]
    width = k * (1 + len(parts))
    idx = np.full((q, width), -1, dtype=np.int64)
    dist = np.full((q, width), np.inf)
    idx[:, :k], dist[:, :k] = chunk.indices, chunk.distances
    for s, part in enumerate(parts, start=1):
        idx[part.rows, s * k:(s + 1) * k] = part.indices
        dist[part.rows, s * k:(s + 1) * k] = part.distances
    # padding (-1, inf) sorts after every real neighbour (distances <= 1)
    order = np.lexsort((idx, dist), axis=-1)[:, :k]
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(dist, order, axis=1)
