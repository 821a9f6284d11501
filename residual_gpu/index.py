"""Public search API: ResidualIndex, KnnResult and the one-call ``residual_knn``.

``method="auto"`` rule (docs/tree.md, "Choosing the method"): brute force when the backend
is not the CPU (the tree runs there through its block schedule, tree/schedule.py, but no device
benchmark has shown it winning yet), when n < AUTO_MIN_N, when the median p
is below AUTO_PRECHECK_P of the variance and a tree over AUTO_PRECHECK_N sampled points spends
at least AUTO_VACUOUS_SHARE of brute force's work (the bounds are vacuous, as on `gold`), or
when the full tree, tried on AUTO_SAMPLE dataset queries (plain mode, k = AUTO_K), would spend
at least AUTO_MAX_SHARE (of the index's precision) of brute force's work (distance evaluations
plus bound and leaf-filter dot products, plus AUTO_SCREEN_WEIGHT per pair the leaf filter
screened, per candidate); the tree otherwise. The estimate (and the tree's
build) is paid only once the queries are large enough to repay it: while the admissible (query,
candidate) pairs of this index's queries so far, the current one included, stay below
AUTO_ESTIMATE_RATIO x AUTO_BUILD_PAIRS x n, queries run brute force and the method stays
undecided; the query that reaches it (one large query, or the last of many small ones, as a
sharded or batched search sends them), or reading ``index.method`` (which assumes all points),
decides it.

``precision="auto"`` rule (precision.choose_precision, docs/precision.md "The float32 fast
pass"): float32 where the FLOAT32_QUANTILE quantile of the points' float32 margins is below
FLOAT32_MAX_MARGIN, float64 otherwise (tiny residual variances everywhere, as on `gold`); the
parity preset is float64 only.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import scipy.sparse
from tqdm.auto import tqdm

from . import search, sparse
from ._arrays import result_converter, to_host
from ._numba_math import row_norms
from ._validation import _describe, as_float_matrix, as_float_vector, as_index_array, as_int, require_real
from .backends import QueryBatch, get_backend
from .brute import BruteSelect
from .errors import IndexFormatError, InvalidArgumentError, InvalidTypeError, ResidualGPUError
from .hilbert import hilbert_order
from .kernels import Kernel, make_kernel
from .precision import PRECISIONS, choose_precision
from .problem import ProblemView, ResidualProblem
from .search import exact_knn, initial_keep
from .telemetry import Telemetry
from .tree import (
    DEFAULT_LEAF_SIZE,
    DEFAULT_TILE_SIZE,
    POP_BATCH,
    SearchTree,
    TraversalFlags,
    TreeSearcher,
    arrays_digest,
    build_tree,
)

METHODS = ("auto", "brute", "tree")
#: ``method="auto"``: below this many points brute force always wins
AUTO_MIN_N = 4096
#: ``method="auto"``: queries sampled (dataset points, fixed seed) and k used for the estimate
AUTO_SAMPLE = 256
AUTO_TILES = 2
AUTO_K = 30
#: ``method="auto"`` picks the tree only if its estimated work share is below this, per fast-pass
#: precision: float32 speeds brute force up more than the tree (1.41x against 1.2x on vif 32768),
#: so the tree must prune more to win (vif, docs/tree.md section 6: float32 at share 0.31 the tree
#: is 1.18x slower, at 0.18 1.57x faster; float64 at 0.31 it is 1.06x faster)
AUTO_MAX_SHARE = {"float64": 0.35, "float32": 0.25}
#: a (query, point) pair the leaf filter screens costs about this much of an evaluated pair (its
#: kernel and transform stay; the products are counted apart): with it the estimated work moves
#: as the query time does when the filter is switched on (vif, float32: 0.97x at n = 32768, where
#: the time is 0.98x; 0.82x at 131072, where it is 0.79x), so the shares above keep their meaning
AUTO_SCREEN_WEIGHT = 0.6
#: the tree's build costs about as much as brute force over this many (query, candidate) pairs
#: per point (vif, n = 32768 and 131072, m = 512, float64 and float32: 800-1100, docs/tree.md
#: section 6), so an estimate that ends in brute force wastes about that much
AUTO_BUILD_PAIRS = 1000
#: ``method="auto"`` estimates only for a query of at least this many times the build's pairs:
#: whatever it decides, deciding costs at most ~1/AUTO_ESTIMATE_RATIO of brute force's time
AUTO_ESTIMATE_RATIO = 10
#: ``method="auto"`` pre-check: a tree over this many sampled points; a work share at or above
#: AUTO_VACUOUS_SHARE there means the bounds are vacuous (brute force, without the full build)
AUTO_PRECHECK_N = 4096
AUTO_VACUOUS_SHARE = 0.9
#: the pre-check runs only where median(p) < AUTO_PRECHECK_P * variance
AUTO_PRECHECK_P = 0.01
#: tree parameter sets. "parity" (docs/tree.md, "Parity preset") is what the Rust oracle
#: re-implements: small leaves and tiles, fixed-order arithmetic instead of BLAS, accurate block
#: values and no brute-force routing, so that both engines produce the same tree and counters.
PRESETS = {
    "default": {"leaf_size": DEFAULT_LEAF_SIZE, "tile_size": DEFAULT_TILE_SIZE, "pop_batch": POP_BATCH,
                "sequential": False, "precision": "auto"},
    "parity": {"leaf_size": 16, "tile_size": 32, "pop_batch": 8, "sequential": True, "precision": "float64"},
}
#: saved index files
INDEX_FORMAT = "residual_gpu.index"
INDEX_FORMAT_VERSION = 1


@dataclass
class KnnResult:
    """indices (q, k) int64 and distances (q, k) float64, ascending, ties to the smaller index.

    Rows with fewer than k admissible neighbours are padded with index -1 and distance inf.
    The arrays are numpy, or those of the ``like=`` array's library given to ``query``.
    ``query_ids`` are the dataset indices queried (None for new locations), ``n_points`` the
    points searched and ``predecessor`` the mode: what ``to_csr`` and ``vecchia_pattern`` need.
    """

    indices: Any
    distances: Any
    telemetry: Telemetry
    query_ids: np.ndarray | None
    n_points: int
    predecessor: bool

    def __iter__(self):
        return iter((self.indices, self.distances))

    def to_csr(self) -> scipy.sparse.csr_array:
        """The neighbour graph, (q, n_points) scipy.sparse CSR with the distances as values.

        Padding is dropped; a neighbour at distance exactly 0.0 stays a stored entry (read the
        pattern from ``indices``/``indptr``, not from ``!= 0``); columns ascend in each row.
        """
        return sparse.neighbour_graph(to_host(self.indices)[0], to_host(self.distances)[0], self.n_points)

    def vecchia_pattern(self) -> scipy.sparse.csr_array:
        """The Vecchia sparsity pattern, (n, n) boolean CSR, lower triangular: row i holds i and
        its neighbours j < i. Needs an all-points predecessor query (``query(k, predecessor=True)``)."""
        every = self.query_ids is not None and np.array_equal(self.query_ids, np.arange(self.n_points))
        if not (self.predecessor and every):
            asked = ("new locations (query_coords)" if self.query_ids is None
                     else f"{self.query_ids.size} dataset queries" if not every else "all points")
            raise InvalidArgumentError(
                "vecchia_pattern() needs the result of an all-points predecessor query "
                f"(index.query(k, predecessor=True)), got predecessor={self.predecessor} with {asked}")
        return sparse.vecchia_pattern(to_host(self.indices)[0])


class ResidualIndex:
    """A residual-correlation neighbour index over one ResidualProblem.

    ``backend`` ("auto", "cpu", "cuda", "jax") is resolved once here and kept in
    ``self.backend``; ``method`` ("auto", "brute", "tree") likewise in ``self.method``
    (``self.auto_reason`` says why "auto" chose it; "auto" decides at the first query large
    enough to repay its estimate, smaller queries run brute force, see the module docstring). ``precision`` ("auto", "float64",
    "float32") is that of the fast pass of either method, resolved once into
    ``self.precision`` (``self.precision_reason`` says why); the certification and the
    re-ranking stay float64, so the answers are the same bits in either (docs/precision.md).
    The tree (method "tree") is built here, with ``leaf_size`` points per leaf, and searched in
    tiles of ``tile_size`` queries (docs/tree.md). Leaf size, tile size and precision default to
    the ``preset``'s: "default", or "parity", the Rust oracle's reference mode, for method "tree"
    only. ``leaf_precision`` is the deprecated name of ``precision``. ``traversal``: the tree
    traversal's scheduling flags (``residual_gpu.TraversalFlags``; the leaf filter on, the others
    off by default), which change the work, never the answers.
    """

    def __init__(self, problem: ResidualProblem, backend: str = "auto", method: str = "auto", *,
                 leaf_size: int | None = None, tile_size: int | None = None, preset: str = "default",
                 precision: str | None = None, leaf_precision: str | None = None, progress: bool | None = None,
                 traversal: TraversalFlags | None = None, _tree=None):
        if not isinstance(problem, ResidualProblem):
            raise InvalidTypeError(f"problem must be a ResidualProblem, got problem={_describe(problem)}")
        if not isinstance(method, str):
            raise InvalidTypeError(f"method must be a string, got method={method!r}")
        if method not in METHODS:
            raise InvalidArgumentError(f"method must be one of {list(METHODS)}, got method={method!r}")
        if not isinstance(preset, str) or preset not in PRESETS:
            raise InvalidArgumentError(f"preset must be one of {list(PRESETS)}, got preset={preset!r}")
        if preset != "default" and method != "tree":
            raise InvalidArgumentError(f"preset={preset!r} configures the tree: it needs method='tree', got method={method!r}")
        self.preset = preset
        self._options = PRESETS[preset]
        if traversal is not None and not isinstance(traversal, TraversalFlags):
            raise InvalidTypeError(f"traversal must be a residual_gpu.TraversalFlags, got traversal={_describe(traversal)}")
        if traversal is not None and traversal != TraversalFlags() and self._options["sequential"]:
            raise InvalidArgumentError(f"preset={preset!r} fixes the traversal (the Rust oracle's), got traversal={traversal!r}")
        self.traversal = TraversalFlags() if traversal is None else traversal
        self.leaf_size = as_int(self._options["leaf_size"] if leaf_size is None else leaf_size, "leaf_size", low=1)
        self.tile_size = as_int(self._options["tile_size"] if tile_size is None else tile_size, "tile_size", low=1)
        if leaf_precision is not None:
            warnings.warn("leaf_precision is deprecated: use precision=, which governs brute force too",
                          DeprecationWarning, stacklevel=2)
            if precision is not None and precision != leaf_precision:
                raise InvalidArgumentError(f"pass precision= only (leaf_precision is its deprecated name), got "
                                           f"precision={precision!r} and leaf_precision={leaf_precision!r}")
            precision = leaf_precision
        if precision is None:
            precision = self._options["precision"]
        if not isinstance(precision, str) or precision not in PRECISIONS:
            raise InvalidArgumentError(f"precision must be one of {list(PRECISIONS)}, got precision={precision!r}")
        if self._options["sequential"] and precision != "float64":
            raise InvalidArgumentError(f"preset={preset!r} evaluates float64 values only, got precision={precision!r}")
        self.problem = problem
        self._requested = {"precision": precision, "backend": backend}
        if precision == "auto":
            precision, self.precision_reason = choose_precision(problem.v_norms, problem.p, problem.m, problem.d,
                                                                problem.kernel.variance)
        else:
            self.precision_reason = ""
        self.precision = precision
        self._backend = get_backend(backend)
        self.backend = self._backend.name
        self.tree = None
        self._searcher = None
        #: why "auto" chose what it chose (empty for an explicit method)
        self.auto_reason = ""
        self.auto_estimate: dict = {}
        t0 = time.perf_counter()
        self._prepared = self._backend.prepare(problem)
        self._brute_select = BruteSelect(self._backend, self._prepared, problem, precision)
        self.build_seconds_by_phase = {"prepare": time.perf_counter() - t0}
        self._method = None  # "auto" still undecided (the method property)
        self._undecided_pairs = 0  # admissible pairs queried while undecided (_method_for)
        if method == "brute":
            self._method = "brute"
        elif method == "tree" or _tree is not None:
            self._method = "tree"
            self._set_tree(_tree if _tree is not None else build_tree(
                problem, self.leaf_size, progress=progress, sequential=self._options["sequential"]))
        else:
            self._method = self._choose_without_estimate()

    def with_kernel(self, kernel: Kernel) -> ResidualIndex:
        """The index of ``problem.with_kernel(kernel)`` (new hyper-parameters, the same points and
        inducing points), for an optimisation loop: the same method once decided, backend,
        sizes and requested precision, and the tree's kd layout reused where the new problem
        keeps the same dense set (tree.build_tree's ``layout``). The answers are those of a
        fresh index over the new problem."""
        problem = self.problem.with_kernel(kernel)
        method = "auto" if self._method is None else self._method
        tree = None
        if method == "tree":
            tree = build_tree(problem, self.leaf_size, sequential=self._options["sequential"], layout=self.tree)
        return ResidualIndex(problem, backend=self._requested["backend"], method=method, leaf_size=self.leaf_size,
                             tile_size=self.tile_size, preset=self.preset, precision=self._requested["precision"],
                             traversal=self.traversal, _tree=tree)

    @property
    def method(self) -> str:
        """"brute" or "tree"; an undecided ``method="auto"`` decides here, as for a query of all
        points (building the tree, which is then kept if chosen)."""
        if self._method is None:
            self._method = self._choose_method(progress=False)
        return self._method

    @property
    def build_seconds(self) -> float:
        """Seconds spent building so far (``build_seconds_by_phase`` summed), auto's estimate included."""
        return float(sum(self.build_seconds_by_phase.values()))

    def _set_tree(self, tree) -> None:
        self.tree = tree
        for phase, sec in tree.build_seconds.items():
            self.build_seconds_by_phase[phase] = self.build_seconds_by_phase.get(phase, 0.0) + sec
        prob = self.problem
        t0 = time.perf_counter()
        # the block schedule evaluates whole leaves: no leaf filter bases to build for it
        flags = self.traversal if self.schedule == "fused" else replace(self.traversal, filter_rank=0)
        self._searcher = TreeSearcher(tree, prob.coords, prob.lengthscales, prob.v, prob.p, prob.kernel,
                                      tile_size=self.tile_size, pop_batch=self._options["pop_batch"],
                                      sequential=self._options["sequential"], leaf_precision=self.precision,
                                      flags=flags)
        if self.schedule == "blocks":
            from .tree.schedule import BlockSchedule

            self._searcher.schedule = BlockSchedule(self._searcher, self._backend, prob)
        # V, coordinates and 1/sqrt(p) copied into tree order, and the leaf filter's bases
        seconds = time.perf_counter() - t0
        lf = self._searcher.leaf_filter
        if lf is not None:
            self.build_seconds_by_phase["leaf_filter"] = lf.seconds
            seconds -= lf.seconds
        self.build_seconds_by_phase["tree_layout"] = seconds

    @property
    def schedule(self) -> str:
        """How the tree runs its selects: "fused" (the host traversal) or "blocks" (requests to the
        backend), as ``traversal.schedule`` resolves ("auto": fused on cpu and in the parity preset)."""
        if self.traversal.schedule != "auto":
            return self.traversal.schedule
        return "fused" if self.backend == "cpu" or self._options["sequential"] else "blocks"

    def _choose_without_estimate(self) -> str | None:
        """The ``method="auto"`` rules that need no estimate: "brute", or None (undecided)."""
        if self.backend != "cpu":
            self.auto_reason = (f"backend {self.backend!r}: brute force (method='tree' runs there by block requests, "
                                "but no device benchmark has shown it winning yet)")
            return "brute"
        if self.problem.n < AUTO_MIN_N:
            self.auto_reason = f"n={self.problem.n} < {AUTO_MIN_N}: brute force"
            return "brute"
        return None

    def method_for(self, *, queries=None, query_coords=None, predecessor: bool = False, progress=None) -> str:
        """The method ``query`` would use for these queries ("brute" or "tree"): an undecided
        "auto" answers a query too small to repay its estimate by brute force, and decides
        (estimate, tree build) at the first one large enough, as ``query`` itself does."""
        if self._method is not None:
            return self._method
        n = self.problem.n
        if query_coords is not None:
            pairs = len(query_coords) * n
        elif queries is None:
            pairs = n * (n - 1) // 2 if predecessor else n * n
        else:
            ids = as_index_array(queries, "queries", n=n)
            pairs = int(ids.sum()) if predecessor else ids.size * n
        return self._method_for(pairs, progress, record=False)

    def expect(self, pairs: int, progress=None) -> str:
        """Count ``pairs`` admissible (query, candidate) pairs of queries that are about to come
        as many small calls (residual_gpu.distributed's chunks, a batched pipeline) toward an
        undecided method="auto", as one query of them all would, and return the method those
        calls will use: "auto" then decides before the first of them, not after enough of them
        have run by brute force."""
        return self._method_for(as_int(pairs, "pairs", low=0), progress)

    def _method_for(self, pairs: int, progress, record: bool = True) -> str:
        """The method of a query of ``pairs`` admissible pairs; ``record``: count them (a query
        that runs), not only ask (method_for)."""
        if self._method is not None:
            return self._method
        enough = AUTO_ESTIMATE_RATIO * AUTO_BUILD_PAIRS * self.problem.n
        total = self._undecided_pairs + pairs
        if total < enough:
            if record:
                self._undecided_pairs = total
            self.auto_reason = (f"undecided: {total:.3g} candidate pairs queried so far < {AUTO_ESTIMATE_RATIO} x "
                                f"{AUTO_BUILD_PAIRS} x n = {enough:.3g} cannot repay the tree's estimate: brute force")
            return "brute"
        self._method = self._choose_method(progress)
        return self._method

    def _choose_method(self, progress) -> str:
        """The documented ``method="auto"`` estimate (module docstring), for a CPU problem of
        n >= AUTO_MIN_N."""
        prob = self.problem
        t0 = time.perf_counter()
        # 1. where residual variances are small, a cheap pre-check on a subsample: are the
        #    bounds vacuous (as on `gold`)? Then brute force, without the full build.
        if np.median(prob.p) < AUTO_PRECHECK_P * prob.kernel.variance:
            sub = np.sort(np.random.default_rng(1).choice(prob.n, min(prob.n, AUTO_PRECHECK_N), replace=False))
            view = ProblemView(prob, sub)
            pre = TreeSearcher(build_tree(view, self.leaf_size, progress=False), view.coords, view.lengthscales,
                               view.v, view.p, view.kernel, tile_size=self.tile_size, leaf_precision=self.precision)
            pre_share = _estimate_share(pre, view, None)
            self.auto_estimate = {"precheck_points": int(sub.size), "precheck_work_share": pre_share}
            if pre_share >= AUTO_VACUOUS_SHARE:
                self.build_seconds_by_phase["auto_estimate"] = time.perf_counter() - t0
                self.auto_reason = (f"bounds vacuous: work share {pre_share:.3f} >= {AUTO_VACUOUS_SHARE} on a "
                                    f"{sub.size}-point subsample: brute force")
                return "brute"
            self.build_seconds_by_phase["auto_estimate"] = time.perf_counter() - t0
        # 2. the full tree, tried on compact tiles of dataset queries
        self._set_tree(build_tree(prob, self.leaf_size, progress=progress))
        t1 = time.perf_counter()
        share = _estimate_share(self._searcher, prob, self._brute_select, self.auto_estimate)
        self.build_seconds_by_phase["auto_estimate"] = (self.build_seconds_by_phase.get("auto_estimate", 0.0)
                                                        + time.perf_counter() - t1)
        most = AUTO_MAX_SHARE[self.precision]
        if share < most:
            self.auto_reason = f"estimated tree work share {share:.3f} < {most} ({self.precision}): tree"
            return "tree"
        self.auto_reason = f"estimated tree work share {share:.3f} >= {most} ({self.precision}): brute force"
        self.tree = None
        self._searcher = None
        for phase in ("tree_split", "tree_summaries", "tree_layout", "leaf_filter"):
            self.build_seconds_by_phase["tree_discarded"] = (self.build_seconds_by_phase.get("tree_discarded", 0.0)
                                                             + self.build_seconds_by_phase.pop(phase, 0.0))
        return "brute"

    def _batch(self, queries, query_coords, predecessor: bool) -> QueryBatch:
        prob = self.problem
        if query_coords is not None:
            if queries is not None:
                raise InvalidArgumentError("pass either queries= (dataset indices) or query_coords= (new locations), not both")
            if predecessor:
                raise InvalidArgumentError("predecessor=True needs dataset queries; new locations (query_coords) have no order")
            xq, vq, pq = prob.factors_at(query_coords)
            q = xq.shape[0]
            return QueryBatch(xq, vq, pq, row_norms(vq),
                              np.full(q, -1, dtype=np.int64), np.full(q, prob.n, dtype=np.int64))
        ids = np.arange(prob.n, dtype=np.int64) if queries is None else as_index_array(queries, "queries", n=prob.n)
        limit = ids.copy() if predecessor else np.full(ids.size, prob.n, dtype=np.int64)
        return QueryBatch(prob.coords[ids], prob.v[ids], prob.p[ids], prob.v_norms[ids], ids, limit)

    def query(self, k: int, *, queries=None, query_coords=None, predecessor: bool = False,
              progress: bool | None = None, telemetry_path=None, like=None) -> KnnResult:
        """The k nearest neighbours in residual distance d = sqrt(1 - |rho|).

        queries: dataset indices (default: every point); query_coords: new locations (q, d).
        Both, like the problem's arrays, may come from numpy, CuPy, JAX or PyTorch.
        predecessor: neighbours of dataset point i restricted to j < i (Vecchia ordering).
        telemetry_path: append the call's telemetry as one JSON line to this file.
        like: an array (e.g. the query_coords passed) whose library and device the result's
        indices and distances take; None (default) keeps them numpy.
        """
        if not isinstance(predecessor, (bool, np.bool_)):
            raise InvalidTypeError(f"predecessor must be a bool, got predecessor={predecessor!r}")
        convert = result_converter(like)
        batch = self._batch(queries, query_coords, bool(predecessor))
        query_ids = None if query_coords is not None else batch.self_index
        most = self.problem.n if query_coords is not None else self.problem.n - 1
        # In predecessor mode early rows have fewer than k admissible points and are padded,
        # but no row can ever have more than n - 1.
        k = as_int(k, "k", low=1, high=most)
        return self._search(batch, k, bool(predecessor), progress, telemetry_path, query_ids, convert)

    def query_from_factors(self, k: int, coords, v, p, *, self_index=None, limit=None, floor=None,
                           progress: bool | None = None, telemetry_path=None) -> KnnResult:
        """The k nearest neighbours of queries given by their factors: coordinates (q, d), V rows
        (q, m) and residual variances p (q,), computed with this problem's kernel and inducing
        points (the rows of another problem's V over the same U, as residual_gpu.distributed's
        shards exchange them).

        self_index: per query, a dataset index it must not return (its own), or -1 (default: -1).
        limit: per query, only points j < limit are admissible (predecessor mode in this
        problem's indices; default: n). Rows with fewer than k admissible points are padded with
        -1 and inf; k may be at most n.
        floor: per query, a distance (>= 0, inf for none): only the neighbours at distance <= floor
        are wanted, and a row holds exactly the top k of those (the same indices and bits as
        without a floor), possibly followed by farther points, then padding. The search prunes
        with it from the start, so a floor known beforehand (another shard's k-th distance)
        saves the evaluations that would only have found points beyond it.
        """
        prob = self.problem
        xq = as_float_matrix(coords, "coords", ncols=prob.d)
        q = xq.shape[0]
        vq = as_float_matrix(v, "v", ncols=prob.m)
        if vq.shape[0] != q:
            raise InvalidArgumentError(f"v must have one row per query (q={q}), got v.shape={vq.shape}")
        pq = as_float_vector(p, "p", length=q, positive=True)
        own = np.full(q, -1, dtype=np.int64) if self_index is None else _per_query(self_index, "self_index", q, -1,
                                                                                    prob.n - 1)
        upto = np.full(q, prob.n, dtype=np.int64) if limit is None else _per_query(limit, "limit", q, 0, prob.n)
        k = as_int(k, "k", low=1, high=prob.n)
        cut = None if floor is None else _distance_floor(floor, q)
        batch = QueryBatch(xq, vq, pq, row_norms(vq), own, upto, floor=cut)
        return self._search(batch, k, limit is not None, progress, telemetry_path, None, result_converter(None))

    def _search(self, batch: QueryBatch, k: int, predecessor: bool, progress, telemetry_path, query_ids,
                convert) -> KnnResult:
        method = self._method_for(int(np.minimum(batch.limit, self.problem.n).sum()), progress)
        telemetry = Telemetry(method=method, backend=self.backend, queries=batch.size, k=k,
                              predecessor=bool(predecessor), precision=self.precision)
        t0 = time.perf_counter()
        if method == "tree":
            tree = self.tree
            telemetry.tree_nodes = tree.nodes
            telemetry.tree_leaves = tree.leaves
            telemetry.dense_points = int(tree.dense.size)
            telemetry.leaf_precision = self._searcher.leaf_precision

            idx = np.empty((batch.size, k), dtype=np.int64)
            dist = np.empty((batch.size, k))
            # queries the tree would route to brute force (tiny p) are answered together by one
            # brute-force search: a few of them per tree group would stream all of V each time
            routed = self._searcher.routed(batch)
            if routed.any():
                rows = np.flatnonzero(routed)
                before = telemetry.distance_evaluations
                t1 = time.perf_counter()
                idx[rows], dist[rows] = exact_knn(self._brute_select, self.problem, batch.take(rows), k, telemetry,
                                                  False)
                telemetry.brute_queries += int(rows.size)
                telemetry.brute_evaluations += telemetry.distance_evaluations - before
                telemetry.add_seconds("brute_routed", time.perf_counter() - t1)
                batch = batch.take(np.flatnonzero(~routed))
            tree_rows = np.flatnonzero(~routed)

            def select(sub, keep):
                return self._searcher.select(sub, keep, None, telemetry, k=k)

            # spatially compact groups of at most one search chunk each (TreeSearcher.query_groups)
            groups = self._searcher.query_groups(batch, search.QUERY_CHUNK)
            disable = True if progress is False or (progress is None and len(groups) <= 1) else (
                None if progress is None else False)
            with tqdm(total=batch.size, unit="query", disable=disable, leave=False, delay=1.0,
                      desc=f"residual kNN (tree, {self.backend})") as bar:
                for rows in groups:
                    gi, gd = exact_knn(select, self.problem, batch.take(rows), k, telemetry, False)
                    idx[tree_rows[rows]] = gi
                    dist[tree_rows[rows]] = gd
                    bar.update(rows.size)
        else:
            idx, dist = exact_knn(self._brute_select, self.problem, batch, k, telemetry, progress)
        telemetry.add_seconds("query", time.perf_counter() - t0)
        if telemetry_path is not None:
            telemetry.write_jsonl(telemetry_path)
        return KnnResult(convert(idx), convert(dist), telemetry, query_ids, self.problem.n, bool(predecessor))

    # -- persistence ---------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the problem's arrays, the method and the tree to an .npz file (no pickle).

        The file holds a format id and version and a sha256 digest of its arrays;
        ``ResidualIndex.load`` checks all three.
        """
        prob = self.problem
        kern = prob.kernel
        arrays = {
            "coords": prob.coords, "v": prob.v, "p": prob.p,
            "kernel_name": np.asarray(kern.name), "kernel_lengthscale": np.asarray(kern.lengthscale, dtype=np.float64),
            "kernel_variance": np.asarray(kern.variance), "jitter": np.asarray(prob.jitter),
            "p_floor": np.asarray(prob.p_floor), "method": np.asarray(self.method),
            "leaf_size": np.asarray(self.leaf_size), "tile_size": np.asarray(self.tile_size),
            "preset": np.asarray(self.preset), "precision": np.asarray(self.precision),
            "has_inducing": np.asarray(prob.inducing is not None),
            "inducing": prob.inducing if prob.inducing is not None else np.zeros((0, prob.d)),
        }
        if self.tree is not None:
            arrays.update(self.tree.to_arrays())
        header = {"format": np.asarray(INDEX_FORMAT), "format_version": np.asarray(INDEX_FORMAT_VERSION),
                  "digest": np.asarray(arrays_digest(arrays))}
        with open(path, "wb") as fh:  # a file object: np.savez would append ".npz" to a bare name
            np.savez(fh, **header, **arrays)

    @classmethod
    def load(cls, path, backend: str = "auto", tile_size: int | None = None) -> ResidualIndex:
        """An index saved by ``save``; raises IndexFormatError if the file is corrupted or mismatched."""
        try:
            with np.load(path, allow_pickle=False) as npz:
                data = {name: npz[name] for name in npz.files}
        except FileNotFoundError:
            raise
        except Exception as exc:  # zip, CRC, header and pickle errors all mean a bad file
            raise IndexFormatError(f"cannot read index file {path!r}: {exc}") from exc
        try:
            fmt = str(data.pop("format"))
            version = int(data.pop("format_version"))
            digest = str(data.pop("digest"))
        except KeyError as exc:
            raise IndexFormatError(f"{path!r} is not a residual_gpu index file (missing {exc})") from exc
        if fmt != INDEX_FORMAT:
            raise IndexFormatError(f"{path!r} is not a residual_gpu index file (format {fmt!r})")
        if version != INDEX_FORMAT_VERSION:
            raise IndexFormatError(f"{path!r} has index format version {version}; this version reads "
                                   f"{INDEX_FORMAT_VERSION}")
        if arrays_digest(data) != digest:
            raise IndexFormatError(f"{path!r} is corrupted: its arrays do not match the stored digest")
        try:
            kern = make_kernel(str(data["kernel_name"]), lengthscale=(
                float(data["kernel_lengthscale"]) if data["kernel_lengthscale"].ndim == 0
                else data["kernel_lengthscale"]), variance=float(data["kernel_variance"]))
            problem = ResidualProblem.from_factors(
                data["coords"], v=data["v"], p=data["p"], kernel=kern,
                inducing=data["inducing"] if bool(data["has_inducing"]) else None,
                jitter=float(data["jitter"]), p_floor=float(data["p_floor"]))
            method = str(data["method"])
            leaf_size = int(data["leaf_size"])
            saved_tile = int(data["tile_size"])
            preset = str(data["preset"]) if "preset" in data else "default"
            # "leaf_precision": files written before precision= governed brute force too
            saved = data.get("precision", data.get("leaf_precision"))
            precision = str(saved) if saved is not None else None
        except (KeyError, ValueError, TypeError) as exc:
            raise IndexFormatError(f"{path!r} is malformed: {exc}") from exc
        except ResidualGPUError as exc:
            raise IndexFormatError(f"{path!r} holds an invalid problem: {exc}") from exc
        tree = None
        if method == "tree":
            tree = SearchTree.from_arrays(data, n=problem.n, d=problem.d, m=problem.m)
        elif method != "brute":
            raise IndexFormatError(f"{path!r} has unknown method {method!r}")
        if preset not in PRESETS:
            raise IndexFormatError(f"{path!r} has unknown preset {preset!r}")
        return cls(problem, backend=backend, method=method, leaf_size=leaf_size,
                   tile_size=saved_tile if tile_size is None else tile_size, preset=preset,
                   precision=precision, _tree=tree)

    def __repr__(self) -> str:
        method = "auto (undecided)" if self._method is None else self._method
        return f"ResidualIndex({self.problem!r}, backend={self.backend!r}, method={method!r})"


def _one_per_query(arr: np.ndarray, name: str, q: int) -> None:
    """InvalidArgumentError unless ``arr`` is 1-D with q entries (query_from_factors' per-query arguments)."""
    if arr.ndim != 1 or arr.shape[0] != q:
        raise InvalidArgumentError(f"{name} must be 1-D with one entry per query (q={q}), got {name}.shape={arr.shape}")


def _per_query(value, name: str, q: int, low: int, high: int) -> np.ndarray:
    """A fresh int64 array of q values in [low, high] (query_from_factors' self_index and limit)."""
    arr = np.asarray(value)
    _one_per_query(arr, name, q)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidTypeError(f"{name} must hold integers, got {name}.dtype={arr.dtype}")
    out = np.array(arr, dtype=np.int64, copy=True)
    bad = (out < low) | (out > high)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise InvalidArgumentError(f"{name} must be in [{low}, {high}], got {name}[{i}]={out[i]}")
    return out


def _distance_floor(value, q: int) -> np.ndarray:
    """A fresh float64 array of q distance floors, each >= 0 or inf (query_from_factors' floor)."""
    arr = np.asarray(to_host(value)[0])
    _one_per_query(arr, "floor", q)
    require_real(arr, "floor")
    out = np.array(arr, dtype=np.float64, copy=True)
    bad = np.isnan(out) | (out < 0)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise InvalidArgumentError(f"floor must be >= 0 (inf: no floor), got floor[{i}]={out[i]}")
    return out


def _estimate_share(searcher: TreeSearcher, prob, brute_select, record: dict | None = None) -> float:
    """Work share of select passes (plain mode, k = AUTO_K) over AUTO_TILES compact runs of points.

    Runs of AUTO_SAMPLE / AUTO_TILES points consecutive along the Hilbert curve, from fixed-seed
    random starts, are tiles as a full query of all points forms them (one select pass each).
    Work = block pairs + brute-routed evaluations + bound dot products + the leaf filter's products
    and AUTO_SCREEN_WEIGHT per pair it screened, per (query, candidate) pair.
    """
    curve = hilbert_order(prob.coords / prob.lengthscales, *searcher.box)
    per = max(1, AUTO_SAMPLE // AUTO_TILES)
    starts = np.random.default_rng(0).integers(0, max(prob.n - per, 0) + 1, AUTO_TILES)
    k = min(AUTO_K, prob.n - 1)
    tel = Telemetry()
    t0 = time.perf_counter()
    nq = 0
    for s in starts:
        rows = np.sort(curve[s:s + per]).astype(np.int64)
        nq += rows.size
        batch = QueryBatch(prob.coords[rows], prob.v[rows], prob.p[rows], prob.v_norms[rows], rows,
                           np.full(rows.size, prob.n, dtype=np.int64))
        searcher.select(batch, initial_keep(k), brute_select, tel, k=k)
    pairs = nq * (prob.n - 1)
    share = (tel.block_pairs + tel.brute_evaluations + tel.bound_products + tel.filter_products
             + AUTO_SCREEN_WEIGHT * tel.filter_pairs) / pairs
    if record is not None:
        record.update({"sample": nq, "k": k, "work_share": share,
                       "evaluated_share": (tel.block_pairs + tel.brute_evaluations) / pairs,
                       "seconds": time.perf_counter() - t0})
    return share


def residual_knn(coords, k: int, kernel: Kernel, inducing=None, predecessor: bool = False, queries=None,
                 query_coords=None, backend: str = "auto", method: str = "auto", seed: int = 0,
                 progress: bool | None = None, inducing_method: str = "kmeans++",
                 like=None) -> tuple[np.ndarray, np.ndarray]:
    """One call: build the problem and index, return (indices, distances). ``inducing``,
    ``seed`` and ``inducing_method`` as in ResidualProblem (None: min(256, n // 2) points);
    ``backend`` builds the problem's factors too (on the GPU for "cuda", the same bits).

    The arrays in may come from numpy, CuPy, JAX or PyTorch; the results are numpy, or in the
    library and on the device of ``like`` (e.g. ``like=coords``), as in ``ResidualIndex.query``.
    """
    problem = ResidualProblem(coords, kernel=kernel, inducing=inducing, seed=seed, inducing_method=inducing_method,
                              backend=backend)
    index = ResidualIndex(problem, backend=backend, method=method)
    res = index.query(k, queries=queries, query_coords=query_coords, predecessor=predecessor, progress=progress,
                      like=like)
    return res.indices, res.distances
