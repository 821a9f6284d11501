"""DistributedIndex and residual_knn on a dask.distributed Client (docs/distributed.md).

The client holds the coordinates, the inducing points and the results; each worker builds and
holds only its shards (tasks.Shard). A query batch goes in Hilbert-ordered chunks, each chunk
to its home shard first (tasks.search_home), then to every other shard that holds an
admissible point (tasks.search_other, which prunes by the shard bound against the home k-th
distances), and the per-shard lists are merged by (distance, global index) on the client.
At most ``window`` chunks are in flight, so a worker holds the queries of a few chunks only.
"""

from __future__ import annotations

import asyncio
import itertools
import operator
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from distributed import Client, default_client

from .._validation import _describe, as_float_matrix, as_index_array, as_int, check_scaled_spread
from ..errors import InvalidArgumentError, InvalidTypeError, ResidualGPUError
from ..hilbert import hilbert_order
from ..inducing import kmeanspp_indices
from ..kernels import Kernel, make_kernel
from ..problem import DEFAULT_JITTER, DEFAULT_P_FLOOR, ResidualProblem, default_inducing
from .shards import kd_shards, nearest_box
from .tasks import build_shard, merge, plan, search_home, search_other

#: queries per chunk (one home task and at most P - 1 other-shard tasks each)
DEFAULT_CHUNK = 4096
#: a query reruns the chunks it had not collected when a worker holding shards is lost, this often at most
LOST_WORKER_RETRIES = 3
#: seconds between checks that the workers a chunk waits for are still there
LOST_WORKER_POLL_S = 1.0
#: cut nodes per shard summary from the coarse tree (bounds.summarize), besides the dense points
DEFAULT_SUMMARY_LEAVES = 32


class _ShardLost(Exception):
    """A worker holding shards left while tasks pinned to it were in flight."""


@dataclass
class DistributedTelemetry:
    """What one distributed query did: per chunk, its home shard, the other shards it was sent
    to (``searched``: those with a point below the chunk's largest limit), the ones of those
    that searched no query (``pruned``: every query cut by the bound or its limit); over the
    call, the (query, other shard) pairs sent and those actually searched, per shard the
    distance evaluations its searches made (``evaluations``, the work), and how many searches
    each method answered (``methods``: home and other-shard searches, "brute" or "tree"), and
    how often the uncollected chunks were resubmitted after a worker holding shards was lost
    (``reruns``)."""

    shards: int = 0
    chunks: int = 0
    home: list = field(default_factory=list)
    searched: list = field(default_factory=list)
    pruned: list = field(default_factory=list)
    pairs_sent: int = 0
    pairs_searched: int = 0
    evaluations: list = field(default_factory=list)
    methods: dict = field(default_factory=dict)
    reruns: int = 0

    @property
    def pruned_pair_share(self) -> float:
        """Share of the (query, other shard) pairs sent that pruning answered without a search."""
        return 1.0 - self.pairs_searched / self.pairs_sent if self.pairs_sent else 0.0


@dataclass
class DistributedResult:
    """indices (q, k) int64 and distances (q, k) float64, as residual_gpu.KnnResult."""

    indices: np.ndarray
    distances: np.ndarray
    telemetry: DistributedTelemetry

    def __iter__(self):
        return iter((self.indices, self.distances))


def _client(client) -> Client:
    if client is None:
        try:
            return default_client()
        except ValueError as exc:
            raise InvalidArgumentError("client= is required: pass a dask.distributed.Client (no default client "
                                       "is running), got client=None") from exc
    if not isinstance(client, Client):
        raise InvalidTypeError(f"client must be a dask.distributed.Client, got client={_describe(client)}")
    return client


class DistributedIndex:
    """An exact residual-correlation index sharded over the workers of a dask Client.

    ``coords`` (numpy, a dask array, or any array ResidualProblem takes; gathered on the client,
    n x d only: V is never formed here), ``kernel``, ``inducing`` (int: kmeans++ with ``seed``, as
    ResidualProblem; an (m, d) array; None: ``default_inducing(n)``), ``jitter`` and ``p_floor``
    are those of ResidualProblem, and the answers are
    ResidualIndex's over that problem, bit for bit. ``inducing_sample``: with an int
    ``inducing``, run kmeans++ on a seeded sample of this many points (the points
    ``sorted(default_rng(seed).choice(n, inducing_sample, replace=False))``, the inducing points
    ResidualProblem(coords[sample], inducing=m, seed=seed) would choose) instead of on all n.
    ``shards`` (default: the number of workers) spatial shards are built on the workers, round
    robin, one ResidualIndex each with ``backend``, ``method`` and ``precision``.
    """

    def __init__(self, coords, kernel: Kernel, inducing=None, *, client=None, shards: int | None = None,
                 seed: int = 0, inducing_sample: int | None = None, jitter: float = DEFAULT_JITTER,
                 p_floor: float = DEFAULT_P_FLOOR, backend: str = "auto", method: str = "auto",
                 precision: str | None = None, chunk_size: int = DEFAULT_CHUNK,
                 summary_leaves: int = DEFAULT_SUMMARY_LEAVES):
        self.client = _client(client)
        x = as_float_matrix(coords, "coords")
        self.n, self.d = x.shape
        self.kernel = make_kernel(kernel)
        self.lengthscales = self.kernel.lengthscales(self.d)
        bounds = check_scaled_spread([("coords", x)], self.lengthscales, lengthscale=self.kernel.lengthscale)
        seed = as_int(seed, "seed", low=0)
        self.chunk_size = as_int(chunk_size, "chunk_size", low=1)
        leaves = as_int(summary_leaves, "summary_leaves", low=1)
        if inducing is None:
            inducing = default_inducing(self.n)
        if isinstance(inducing, (float, np.floating, bool)):
            raise InvalidTypeError(f"inducing must be an int (a count) or an (m, d) array of points, "
                                   f"got inducing={inducing!r}")
        if isinstance(inducing, (int, np.integer)):
            m = as_int(inducing, "inducing", low=1, high=self.n)
            if inducing_sample is None:
                u = x[kmeanspp_indices(x, m, seed)]
            else:
                size = as_int(inducing_sample, "inducing_sample", low=m, high=self.n)
                sample = x[np.sort(np.random.default_rng(seed).choice(self.n, size, replace=False))]
                u = sample[kmeanspp_indices(sample, m, seed)]
        else:
            if inducing_sample is not None:
                raise InvalidArgumentError(f"inducing_sample needs an int inducing (a count), got "
                                           f"inducing={_describe(inducing)}")
            u = as_float_matrix(inducing, "inducing", ncols=self.d)
        self._bounds = check_scaled_spread([("coords", bounds), ("inducing", u)], self.lengthscales,
                                           lengthscale=self.kernel.lengthscale)
        # the inducing points' own problem: validates K(U, U) + jitter (typed error here, not on a
        # worker) and gives new locations' factors, the same bits as the full problem's factors_at
        self._u_problem = ResidualProblem(u, kernel=self.kernel, inducing=u, jitter=jitter, p_floor=p_floor)
        self.inducing = self._u_problem.inducing
        self.m = u.shape[0]
        info = self.client.scheduler_info()["workers"]
        workers = sorted(info)
        if not workers:
            raise InvalidArgumentError("the client has no workers: start a cluster with at least one worker")
        self.workers = workers
        parts = len(workers) if shards is None else as_int(shards, "shards", low=1)
        self._box_lo, self._box_hi = bounds[0] / self.lengthscales, bounds[1] / self.lengthscales
        scaled = x / self.lengthscales
        self.shard_rows = kd_shards(scaled, parts)
        self.shards = len(self.shard_rows)
        self._scaled = scaled
        self.home_of = np.empty(self.n, dtype=np.int64)
        for s, rows in enumerate(self.shard_rows):
            self.home_of[rows] = s
        self._shard_lo = np.array([scaled[r].min(axis=0) for r in self.shard_rows])
        self._shard_hi = np.array([scaled[r].max(axis=0) for r in self.shard_rows])
        self._first = np.array([r[0] for r in self.shard_rows])
        if method not in ("auto", "brute", "tree"):
            raise InvalidArgumentError(f"method must be one of ['auto', 'brute', 'tree'], got method={method!r}")
        self.method = method
        options = {"backend": backend, "method": method, "precision": precision}
        # pinned round robin; allow_other_workers: a lost worker's shards are rebuilt elsewhere.
        # Each shard's tasks run with its worker's thread count (tasks._threads)
        self._shard_threads = [int(info[workers[s % len(workers)]].get("nthreads", 1)) for s in range(self.shards)]
        self._futures = [
            self.client.submit(build_shard, x[rows], rows, self.kernel, u, jitter, p_floor, options, leaves,
                               self._shard_threads[s], workers=[workers[s % len(workers)]], allow_other_workers=True,
                               pure=True)
            for s, rows in enumerate(self.shard_rows)]
        for fut in self._futures:  # wait for the builds, leaving the shards on the workers
            exc = fut.exception()
            if exc is not None:
                raise exc  # the worker's exception, typed errors as they are

    def shard_memory(self) -> list[int]:
        """Bytes of each shard's problem arrays (coords, V, p), as measured on its worker."""
        return self.client.gather([self.client.submit(lambda s: s.nbytes(), f, pure=False) for f in self._futures])

    def query(self, k: int, *, queries=None, query_coords=None, predecessor: bool = False,
              window: int | None = None, compute: bool = True) -> DistributedResult:
        """The k nearest neighbours, as ResidualIndex.query (same arguments, same bits).

        window: chunks in flight at once (default: twice the workers).
        compute=False: return at once, with ``indices`` and ``distances`` as dask arrays (one
        block per chunk, in query order) whose computation runs the search; every chunk is then
        submitted together (no window) and the telemetry stays empty.
        """
        if not isinstance(compute, (bool, np.bool_)):
            raise InvalidTypeError(f"compute must be a bool, got compute={compute!r}")
        if not isinstance(predecessor, (bool, np.bool_)):
            raise InvalidTypeError(f"predecessor must be a bool, got predecessor={predecessor!r}")
        predecessor = bool(predecessor)
        if query_coords is not None:
            if queries is not None:
                raise InvalidArgumentError("pass either queries= (dataset indices) or query_coords= (new locations), not both")
            if predecessor:
                raise InvalidArgumentError("predecessor=True needs dataset queries; new locations (query_coords) have no order")
            xq = as_float_matrix(query_coords, "query_coords", ncols=self.d)
            check_scaled_spread([("the problem's coords and inducing points", self._bounds), ("query_coords", xq)],
                                self.lengthscales, lengthscale=self.kernel.lengthscale)
            scaled_q = xq / self.lengthscales
            home = np.concatenate([nearest_box(scaled_q[s:s + 65536], self._shard_lo, self._shard_hi)
                                   for s in range(0, xq.shape[0], 65536)])
            k = as_int(k, "k", low=1, high=self.n)
        else:
            ids = np.arange(self.n, dtype=np.int64) if queries is None else as_index_array(queries, "queries", n=self.n)
            scaled_q = self._scaled[ids]
            home = self.home_of[ids]
            k = as_int(k, "k", low=1, high=self.n - 1)
        window = 2 * len(self.workers) if window is None else as_int(window, "window", low=1)
        q = home.size
        # chunks: per home shard in Hilbert order (so a chunk is compact and prunes together),
        # the shards taken in turn, so every worker has home searches from the start
        order = np.lexsort((np.argsort(hilbert_order(scaled_q, self._box_lo, self._box_hi)), home))
        per_home = []
        for h in range(self.shards):
            rows_h = order[home[order] == h]
            per_home.append([(rows_h[s:s + self.chunk_size], h) for s in range(0, rows_h.size, self.chunk_size)])
        chunks = [c for turn in itertools.zip_longest(*per_home) for c in turn if c is not None]

        def submit(rows, h, pin):
            """The chunk's home task and its other-shard tasks, pinned by ``pin`` (shard -> worker
            options); returns (other shards, home future, other futures)."""
            if query_coords is not None:
                spec = {"factors": self._u_problem.factors_at(xq[rows])}
            else:
                spec = {"ids": ids[rows]}
            top_limit = self.n if not predecessor else int(ids[rows].max())
            chunk = self.client.submit(search_home, self._futures[h], k, self.n, predecessor,
                                       threads=self._shard_threads[h], pure=True, **spec, **pin(h))
            others = [s for s in range(self.shards) if s != h and self._first[s] < top_limit]
            parts = [self.client.submit(search_other, self._futures[s], chunk, k, self._shard_threads[s], pure=True,
                                        **pin(s)) for s in others]
            return others, chunk, parts

        if not compute:
            # every chunk in flight; loosely pinned, so Dask itself reruns what a lost worker held
            if self.method == "auto":
                self._plan(home, None if query_coords is not None else ids, predecessor, self._loose_pin, None)
            lazy = []
            for rows, h in chunks:
                _, chunk, parts = submit(rows, h, self._loose_pin)
                lazy.append((rows, self.client.submit(merge, k, chunk, parts, pure=True)))
            return DistributedResult(*_lazy_result(lazy, q, k), DistributedTelemetry(shards=self.shards))
        out_idx = np.empty((q, k), dtype=np.int64)
        out_dist = np.empty((q, k))
        tel = DistributedTelemetry(shards=self.shards, evaluations=[0] * self.shards)
        done = np.zeros(len(chunks), dtype=np.bool_)
        for _ in range(LOST_WORKER_RETRIES + 1):
            # tasks pinned strictly to the worker holding their shard: work stealing would move a
            # task to an idle worker, which then rebuilds the shard (seconds, and a second copy)
            pending: deque = deque()
            try:
                holders = self._holders()
                pin = lambda s, holders=holders: {"workers": [holders[s]], "allow_other_workers": False}
                if self.method == "auto":  # again after a loss: a rebuilt shard is undecided
                    self._plan(home, None if query_coords is not None else ids, predecessor, pin, holders)
                for c, (rows, h) in enumerate(chunks):
                    if done[c]:
                        continue
                    pending.append((c, rows, h, *submit(rows, h, pin)))
                    if len(pending) >= window:
                        self._collect(pending.popleft(), k, out_idx, out_dist, tel, holders, done)
                while pending:
                    self._collect(pending.popleft(), k, out_idx, out_dist, tel, holders, done)
                return DistributedResult(out_idx, out_dist, tel)
            except _ShardLost:
                tel.reruns += 1
                self.client.cancel([f for item in pending for f in (item[4], *item[5])])
        raise ResidualGPUError(f"workers holding shards were lost {LOST_WORKER_RETRIES + 1} times during one query; "
                               "no partial result is returned")

    @staticmethod
    def _loose_pin(s: int) -> dict:
        return {}

    def _holders(self) -> list[str]:
        """Per shard, a worker holding it now (after Dask has rebuilt the shards of a lost worker)."""
        for fut in self._futures:
            exc = fut.exception()  # wait for a rebuild, leaving the shard on its worker
            if exc is not None:
                raise exc  # Dask gave up on the shard (KilledWorker, or the build's own error)
        who = self.client.who_has(self._futures)
        holders = []
        for s, fut in enumerate(self._futures):
            have = sorted(who.get(fut.key, ()))
            if not have:  # lost again between the wait and now: let the caller retry
                raise _ShardLost
            mine = self.workers[s % len(self.workers)]
            holders.append(mine if mine in have else have[0])
        return holders

    def _plan(self, home: np.ndarray, ids: np.ndarray | None, predecessor: bool, pin, holders) -> None:
        """Before the chunks go out, tell each shard's method="auto" the candidate pairs of the
        chunks it is home to (tasks.plan), so that it decides (estimate, tree) once for the whole
        batch instead of answering its first chunks by brute force; the other shards' searches,
        pruned by bound and floor, are not counted. Pinned by ``pin`` like the searches (a plan
        may build the shard's tree: seconds, which work stealing would otherwise move)."""
        futures, used = [], set()
        for s, rows in enumerate(self.shard_rows):
            mine = home == s
            if predecessor:
                pairs = int(np.searchsorted(rows, ids[mine]).sum())
            else:
                pairs = int(np.count_nonzero(mine)) * rows.size
            if pairs:
                futures.append(self.client.submit(plan, self._futures[s], pairs, self._shard_threads[s], pure=False,
                                                  **pin(s)))
                if holders is not None:
                    used.add(holders[s])
        self._results(futures, used)

    def _results(self, futures, used: set) -> list:
        """The futures' results, in order; raises _ShardLost when one of the workers ``used``
        (those the futures are pinned to) has gone, since such a task would wait for it forever
        (a finished task's data may also still be on a lost worker)."""
        return self.client.sync(self._gather_while_held, futures, used)

    async def _gather_while_held(self, futures, used: set) -> list:
        # One gather, never cancelled: the client shares a pending gather between its callers
        # (distributed 2026.11's Client._gather_future), and one cancelled before it started -
        # as fut.result(timeout=...) did when the timeout fell just as the task finished - leaves
        # every later gather of that client awaiting a cancelled task (an UnboundLocalError).
        fetch = asyncio.ensure_future(self.client.gather(futures, asynchronous=True))
        while True:
            done, _ = await asyncio.wait([fetch], timeout=LOST_WORKER_POLL_S)
            if done:
                return fetch.result()
            info = await self.client.scheduler.identity(n_workers=-1)
            if not used <= set(info["workers"]):
                # left to end when the caller cancels the futures; its error is expected
                fetch.add_done_callback(lambda f: f.cancelled() or f.exception())
                raise _ShardLost

    def _collect(self, item, k, out_idx, out_dist, tel: DistributedTelemetry, holders, done) -> None:
        """Wait for one chunk's tasks (_results) and merge them into the output."""
        c, rows, h, others, chunk_f, part_fs = item
        chunk, *parts = self._results([chunk_f, *part_fs], {holders[s] for s in (h, *others)})
        out_idx[rows], out_dist[rows] = merge(k, chunk, parts)
        tel.chunks += 1
        tel.home.append(h)
        tel.searched.append(len(others))
        tel.pruned.append(sum(1 for p in parts if p.rows.size == 0))
        tel.pairs_sent += rows.size * len(parts)
        tel.pairs_searched += sum(int(p.rows.size) for p in parts)
        tel.evaluations[h] += chunk.evaluations
        tel.methods[chunk.method] = tel.methods.get(chunk.method, 0) + 1
        for s, part in zip(others, parts):
            tel.evaluations[s] += part.evaluations
            if part.method:  # a part the bound pruned whole ran no search
                tel.methods[part.method] = tel.methods.get(part.method, 0) + 1
        done[c] = True

    def close(self) -> None:
        """Release the shards on the workers."""
        for fut in self._futures:
            fut.release()
        self._futures = []

    def __repr__(self) -> str:
        return f"DistributedIndex(n={self.n}, d={self.d}, m={self.m}, shards={self.shards}, workers={len(self.workers)})"


def _lazy_result(lazy, q: int, k: int):
    """(indices, distances) dask arrays in query order from per-chunk futures of merge's
    (indices, distances): one block per chunk, then the permutation back to query order."""
    import dask.array as da
    from dask import delayed

    rows = np.concatenate([r for r, _ in lazy]) if lazy else np.zeros(0, dtype=np.int64)
    back = np.empty(q, dtype=np.int64)
    back[rows] = np.arange(q)
    out = []
    for pos, dtype in ((0, np.int64), (1, np.float64)):
        blocks = [da.from_delayed(delayed(operator.itemgetter(pos))(fut), shape=(r.size, k), dtype=dtype)
                  for r, fut in lazy]
        stacked = da.concatenate(blocks) if blocks else da.zeros((0, k), dtype=dtype)
        out.append(stacked[back])
    return out


def residual_knn(coords, k: int, kernel: Kernel, inducing=None, predecessor: bool = False, queries=None,
                 query_coords=None, *, client=None, shards: int | None = None, backend: str = "auto",
                 method: str = "auto", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """residual_gpu.residual_knn on a dask Client: (indices, distances), the same bits
    (``inducing=None``: ``default_inducing(n)`` points, as there)."""
    index = DistributedIndex(coords, kernel, inducing, client=client, shards=shards, seed=seed, backend=backend,
                             method=method)
    try:
        res = index.query(k, queries=queries, query_coords=query_coords, predecessor=predecessor)
    finally:
        index.close()
    return res.indices, res.distances
