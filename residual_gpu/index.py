"""Public search API: ResidualIndex, KnnResult and the one-call ``residual_knn``.

``method="auto"`` rule (docs/tree.md, "Choosing the method"): brute force when the backend
is not the CPU (the tree's leaf blocks run on the host), when n < AUTO_MIN_N, when the median p
is below AUTO_PRECHECK_P of the variance and a tree over AUTO_PRECHECK_N sampled points spends
at least AUTO_VACUOUS_SHARE of brute force's work (the bounds are vacuous, as on `gold`), or
when the full tree, tried on AUTO_SAMPLE dataset queries (plain mode, k = AUTO_K), would spend
at least AUTO_MAX_SHARE of brute force's work (distance evaluations plus bound dot products,
per candidate); the tree otherwise.

``precision="auto"`` rule (precision.choose_precision, docs/precision.md "The float32 fast
pass"): float32 where the FLOAT32_QUANTILE quantile of the points' float32 margins is below
FLOAT32_MAX_MARGIN, float64 otherwise (tiny residual variances everywhere, as on `gold`); the
parity preset is float64 only.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from . import search
from ._numba_math import row_norms
from ._validation import _describe, as_index_array, as_int
from .backends import QueryBatch, get_backend
from .brute import BruteSelect
from .errors import IndexFormatError, InvalidArgumentError, InvalidTypeError, ResidualGPUError
from .hilbert import hilbert_order
from .kernels import Kernel, make_kernel
from .precision import PRECISIONS, choose_precision
from .problem import ProblemView, ResidualProblem
from .search import exact_knn, initial_keep
from .telemetry import Telemetry
from .tree import DEFAULT_LEAF_SIZE, SearchTree, arrays_digest, build_tree
from .tree_search import DEFAULT_TILE_SIZE, POP_BATCH, TreeSearcher

METHODS = ("auto", "brute", "tree")
#: ``method="auto"``: below this many points brute force always wins
AUTO_MIN_N = 4096
#: ``method="auto"``: queries sampled (dataset points, fixed seed) and k used for the estimate
AUTO_SAMPLE = 256
AUTO_TILES = 2
AUTO_K = 30
#: ``method="auto"`` picks the tree only if its estimated work share is below this
AUTO_MAX_SHARE = 0.35
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
    """

    indices: np.ndarray
    distances: np.ndarray
    telemetry: Telemetry

    def __iter__(self):
        return iter((self.indices, self.distances))


class ResidualIndex:
    """A residual-correlation neighbour index over one ResidualProblem.

    ``backend`` ("auto", "cpu", "cuda", "jax") is resolved once here and kept in
    ``self.backend``; ``method`` ("auto", "brute", "tree") likewise in ``self.method``
    (``self.auto_reason`` says why "auto" chose it). ``precision`` ("auto", "float64",
    "float32") is that of the fast pass of either method, resolved once into
    ``self.precision`` (``self.precision_reason`` says why); the certification and the
    re-ranking stay float64, so the answers are the same bits in either (docs/precision.md).
    The tree (method "tree") is built here, with ``leaf_size`` points per leaf, and searched in
    tiles of ``tile_size`` queries (docs/tree.md). Leaf size, tile size and precision default to
    the ``preset``'s: "default", or "parity", the Rust oracle's reference mode, for method "tree"
    only. ``leaf_precision`` is the deprecated name of ``precision``.
    """

    def __init__(self, problem: ResidualProblem, backend: str = "auto", method: str = "auto", *,
                 leaf_size: int | None = None, tile_size: int | None = None, preset: str = "default",
                 precision: str | None = None, leaf_precision: str | None = None, progress: bool | None = None,
                 _tree=None):
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
        if method == "brute":
            self.method = "brute"
        elif method == "tree" or _tree is not None:
            self.method = "tree"
            self._set_tree(_tree if _tree is not None else build_tree(
                problem, self.leaf_size, progress=progress, sequential=self._options["sequential"]))
        else:
            self.method = self._choose_method(progress)
        self.build_seconds = float(sum(self.build_seconds_by_phase.values()))

    def _set_tree(self, tree) -> None:
        self.tree = tree
        for phase, sec in tree.build_seconds.items():
            self.build_seconds_by_phase[phase] = self.build_seconds_by_phase.get(phase, 0.0) + sec
        prob = self.problem
        t0 = time.perf_counter()
        self._searcher = TreeSearcher(tree, prob.coords, prob.lengthscales, prob.v, prob.p, prob.kernel,
                                      tile_size=self.tile_size, pop_batch=self._options["pop_batch"],
                                      sequential=self._options["sequential"], leaf_precision=self.precision)
        # V, coordinates and 1/sqrt(p) copied into tree order
        self.build_seconds_by_phase["tree_layout"] = time.perf_counter() - t0

    def _choose_method(self, progress) -> str:
        """The documented ``method="auto"`` rule (module docstring)."""
        prob = self.problem
        if self.backend != "cpu":
            self.auto_reason = f"backend {self.backend!r}: tree leaf blocks run on the host, brute force on the device"
            return "brute"
        if prob.n < AUTO_MIN_N:
            self.auto_reason = f"n={prob.n} < {AUTO_MIN_N}: brute force"
            return "brute"
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
        if share < AUTO_MAX_SHARE:
            self.auto_reason = f"estimated tree work share {share:.3f} < {AUTO_MAX_SHARE}: tree"
            return "tree"
        self.auto_reason = f"estimated tree work share {share:.3f} >= {AUTO_MAX_SHARE}: brute force"
        self.tree = None
        self._searcher = None
        for phase in ("tree_split", "tree_summaries", "tree_layout"):
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
              progress: bool | None = None, telemetry_path=None) -> KnnResult:
        """The k nearest neighbours in residual distance d = sqrt(1 - |rho|).

        queries: dataset indices (default: every point); query_coords: new locations (q, d).
        predecessor: neighbours of dataset point i restricted to j < i (Vecchia ordering).
        telemetry_path: append the call's telemetry as one JSON line to this file.
        """
        if not isinstance(predecessor, (bool, np.bool_)):
            raise InvalidTypeError(f"predecessor must be a bool, got predecessor={predecessor!r}")
        batch = self._batch(queries, query_coords, bool(predecessor))
        most = self.problem.n if query_coords is not None else self.problem.n - 1
        # In predecessor mode early rows have fewer than k admissible points and are padded,
        # but no row can ever have more than n - 1.
        k = as_int(k, "k", low=1, high=most)
        telemetry = Telemetry(method=self.method, backend=self.backend, queries=batch.size, k=k,
                              predecessor=bool(predecessor), precision=self.precision)
        t0 = time.perf_counter()
        if self.method == "tree":
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
        return KnnResult(idx, dist, telemetry)

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
        return f"ResidualIndex({self.problem!r}, backend={self.backend!r}, method={self.method!r})"


def _estimate_share(searcher: TreeSearcher, prob, brute_select, record: dict | None = None) -> float:
    """Work share of select passes (plain mode, k = AUTO_K) over AUTO_TILES compact runs of points.

    Runs of AUTO_SAMPLE / AUTO_TILES points consecutive along the Hilbert curve, from fixed-seed
    random starts, are tiles as a full query of all points forms them (one select pass each).
    Work = block pairs + brute-routed evaluations + bound dot products, per (query, candidate) pair.
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
    share = (tel.block_pairs + tel.brute_evaluations + tel.bound_products) / pairs
    if record is not None:
        record.update({"sample": nq, "k": k, "work_share": share,
                       "evaluated_share": (tel.block_pairs + tel.brute_evaluations) / pairs,
                       "seconds": time.perf_counter() - t0})
    return share


def residual_knn(coords, k: int, kernel: Kernel, inducing=None, predecessor: bool = False, queries=None,
                 query_coords=None, backend: str = "auto", method: str = "auto", seed: int = 0,
                 progress: bool | None = None, inducing_method: str = "kmeans++") -> tuple[np.ndarray, np.ndarray]:
    """One call: build the problem and index, return (indices, distances). ``inducing``,
    ``seed`` and ``inducing_method`` as in ResidualProblem (None: min(256, n // 2) points)."""
    problem = ResidualProblem(coords, kernel=kernel, inducing=inducing, seed=seed, inducing_method=inducing_method)
    index = ResidualIndex(problem, backend=backend, method=method)
    res = index.query(k, queries=queries, query_coords=query_coords, predecessor=predecessor, progress=progress)
    return res.indices, res.distances
