"""The host side of the tree search: ``TreeSearcher``, a SearchTree bound to its problem.

``TreeSearcher.select(batch, keep)`` has the contract of ``search.exact_knn``'s select: per
query the ``keep`` admissible candidates of largest fast |rho| among those it evaluated, and
``a_dropped``, an upper bound on |rho| of every admissible candidate it did not keep. Pruning
a (query, node) pair is a drop with the node's bound U_q (docs/tree.md), so certification
(certify.py) proves the final top k exactly as for brute force.

``select`` routes the queries the tree cannot serve well to brute force, computes the others'
factors (bounds.query_factors) and rounding margins, and ``run`` hands them, in Hilbert order,
to the traversal (traversal.py). ``euclidean_search`` is plain Euclidean kNN on the same code.
"""

from __future__ import annotations

import math
import time

import numpy as np
from numba import njit, parallel_chunksize, prange

from .._blas import single_blas_thread
from .._numba_math import row_norms
from ..backends.base import Candidates, QueryBatch
from ..certify import floor_thresholds
from ..hilbert import hilbert_order
from ..precision import FLOAT32_MAX_MARGIN, candidate_maxima, float32_margins, gamma, kernel_error, query_margins
from .bounds import _U, _bound_matrix, query_factors
from .leaf_filter import build_leaf_filter
from .traversal import COUNTERS, DEFAULT_TILE_SIZE, NCOUNTERS, POP_BATCH, TraversalFlags, _traverse


@njit(parallel=True, cache=True, fastmath=False)
def _gather_rows(src, rows, out):
    """out[i] = src[rows[i]], cast to out's dtype, in one pass (V in tree order)."""
    for i in prange(rows.shape[0]):
        for t in range(src.shape[1]):
            out[i, t] = src[rows[i], t]
    return out


class TreeSearcher:
    """A SearchTree bound to its problem's arrays (in tree order), ready to answer selects."""

    def __init__(self, tree, coords, lengthscales=None, v=None, p=None, kernel=None,
                 tile_size: int = DEFAULT_TILE_SIZE, pop_batch: int = POP_BATCH, sequential: bool = False,
                 leaf_precision: str = "float64", flags: TraversalFlags | None = None):
        """``sequential``: the parity preset's arithmetic (docs/tree.md, "Parity preset"): fixed-order
        loops instead of BLAS for the query factors and bound products, accurate (Dot2) block
        values, so that the Rust oracle reproduces every counter bit for bit. Slower.

        ``leaf_precision``: "float64" or "float32" (leaf blocks' V products in single precision,
        with the wider certified margin of ``margins``), as ResidualIndex resolved it
        (precision.choose_precision decides "auto" for both methods). The dense block is always
        float64 (its tiny p would make float32's margin useless)."""
        if leaf_precision not in ("float64", "float32"):
            raise ValueError(f"leaf_precision must be 'float64' or 'float32', got {leaf_precision!r}")
        self.tree = tree
        self.flags = TraversalFlags() if flags is None else flags
        #: a tree.schedule.BlockSchedule that runs the selects instead of the fused traversal, or None
        self.schedule = None
        self.sequential = bool(sequential)
        self.metric = 0 if tree.metric == "residual" else 1
        self.tile_size = int(tile_size)
        self.pop_batch = int(pop_batch)
        coords = np.ascontiguousarray(coords, dtype=np.float64)
        d = coords.shape[1]
        self.scale = np.ones(d) if lengthscales is None else np.asarray(lengthscales, dtype=np.float64)
        self.inv_scale = 1.0 / self.scale
        perm = tree.perm
        dense = tree.dense
        leaf_sizes = (tree.node_end - tree.node_start)[tree.node_left < 0]
        self.blk_cap = int(max(leaf_sizes.max(initial=1), dense.size, 1))
        self.pidx = perm
        self.pxt = np.ascontiguousarray(coords[perm].T)
        self.didx = dense
        self.dxt = np.ascontiguousarray(coords[dense].T)
        scaled = coords * self.inv_scale
        self.box = (scaled.min(axis=0), scaled.max(axis=0)) if coords.shape[0] else (np.zeros(d), np.ones(d))
        if self.metric == 0:
            self.kernel = kernel
            self.variance = float(kernel.variance)
            self.kernel_id = kernel.kernel_id
            m = self.m = v.shape[1]
            ip = 1.0 / np.sqrt(p)
            self.pp = p[perm]
            self.dp = p[dense]
            self.pip = ip[perm]
            self.dip = ip[dense]
            self.dv = np.ascontiguousarray(v[dense])
            t = tree.transform
            self.tnorm = float(row_norms(t.reshape(1, -1))[0]) * (1.0 + (m + 2) * _U) if t.size else math.sqrt(m)
            self.kerr = kernel_error(d) * self.variance
            self.eps_d = 4.0 * (d + 8) * _U
            self.gam = 2.0 * gamma(m + 4)
            self.mid, self.rad = tree.node_mid, tree.node_rad
            # the problem-wide maxima search.exact_knn feeds to query_margins, and the maxima
            # over the tree's points (the candidates of the float32 leaf blocks)
            vn = row_norms(v)
            self.w_max, self.ip_max = candidate_maxima(vn, p)
            self.w_max_tree, self.ip_max_tree = candidate_maxima(vn[perm], p[perm])
            if self.sequential and leaf_precision == "float32":
                raise ValueError("the sequential (parity) mode evaluates accurate float64 values")
            self.leaf_precision = leaf_precision
            fast = np.float32 if leaf_precision == "float32" else np.float64
            # V rows in tree order in the leaf precision (the traversal reads only these), and with
            # float32 leaves the bound products' summaries in float32 too (gam_prod: their
            # rounding, as docs/tree.md section 4a derives)
            self.pv_fast = _gather_rows(np.ascontiguousarray(v), perm, np.empty((perm.size, m), dtype=fast))
            self.mid_fast, self.rad_fast = self.mid.astype(fast), self.rad.astype(fast)
            self.gam_prod = 2.0 * gamma(m + 4, fast)
            rank = self.flags.filter_rank
            self.leaf_filter = None
            if rank > 0 and m > 0 and not self.sequential:
                self.leaf_filter = build_leaf_filter(tree, v, p, rank, fast)
        else:
            self.kernel_id = 0
            self.variance = 1.0
            self.m = 0
            self.pip = self.pp = np.zeros(perm.size)
            self.dp = np.zeros(0)
            self.pv_fast = np.zeros((perm.size, 0))
            self.dip = np.zeros(0)
            self.dv = np.zeros((0, 0))
            self.tnorm = self.kerr = self.eps_d = self.gam = 0.0
            self.mid = self.rad = np.zeros((tree.nodes, 0))
            self.leaf_precision = "float64"
            self.mid_fast, self.rad_fast, self.gam_prod = self.mid, self.rad, 0.0
            self.leaf_filter = None

    # -- per-query factors ---------------------------------------------------------
    def query_factors(self, v: np.ndarray):
        """(a_q = T^-T V_q, bound on ||V_q - T^T a_q||, ||a_q||) for query rows v."""
        return query_factors(self.tree.transform, v, self.gam, self.tnorm, self.sequential)

    # -- the select pass -------------------------------------------------------------
    def run(self, qx, qv, qp, qself, qlimit, keep: int, qa=None, qrn=None, qna=None, k=None, qmarg=None,
            qfloor=None):
        """Raw traversal over queries (in any order); returns heaps, a_dropped, counter totals.

        qp: the queries' residual variances (ones for the Euclidean metric).
        Residual metric: pruning compares bounds with the k-th largest value minus twice
        ``qmarg`` (k = keep when not given, with zero margins), and with ``qfloor`` (per query,
        certify.floor_thresholds; none when not given); Euclidean: with the heap minimum.
        """
        q = qx.shape[0]
        order = hilbert_order(qx * self.inv_scale, *self.box) if q > 1 else np.arange(q)
        take = lambda a: np.ascontiguousarray(a[order])
        qx_o, qv_o, qp_o, qself_o, qlim_o = take(qx), take(qv), take(qp), take(qself), take(qlimit)
        qip_o = 1.0 / np.sqrt(qp_o)
        if self.metric == 0:
            qa_o, qrn_o, qna_o = take(qa), take(qrn), take(qna)
            kk = keep if k is None else min(int(k), keep)
            qmarg_o = np.zeros(q) if qmarg is None else take(qmarg)
            qfloor_o = np.full(q, -np.inf) if qfloor is None else take(qfloor)
        else:
            qa_o = np.zeros((q, 0))
            qrn_o = qna_o = qmarg_o = np.zeros(q)
            qfloor_o = np.full(q, -np.inf)
            kk = 0
        qv_fast, qa_fast = qv_o, qa_o
        if self.leaf_precision == "float32":
            qv_fast, qa_fast = qv_o.astype(np.float32), qa_o.astype(np.float32)
        lf = self.leaf_filter
        if lf is None:
            lf_slot, lf_rank = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
            lf_basis = np.zeros((0, 0, self.m), dtype=qv_fast.dtype)
            lf_coef = np.zeros((0, 0), dtype=qv_fast.dtype)
            lf_tail = lf_under = lf_tail_median = np.zeros(0)
            qw = np.zeros(0)
        else:
            lf_slot, lf_rank, lf_basis, lf_coef = lf.slot, lf.rank, lf.basis, lf.coef
            lf_tail, lf_under, lf_tail_median = lf.tail, lf.under, lf.tail_median
            # w_q = ||V_q|| / sqrt(p_q), rounded up (the filter's bound, leaf_filter.py)
            qw = row_norms(qv_o) * qip_o * (1.0 + (self.m + 8) * _U)
        kth_a = np.full((q, kk), -np.inf)
        kth_n = np.zeros(q, dtype=np.int64)
        heap_a = np.full((q, keep), -np.inf if self.metric else -1.0)
        heap_i = np.full((q, keep), -1, dtype=np.int64)
        count = np.zeros(q, dtype=np.int64)
        a_dropped = np.full(q, -1.0)
        ntiles = max(1, -(-q // self.tile_size))
        counters = np.zeros((ntiles, NCOUNTERS), dtype=np.int64)
        tr = self.tree
        if q:
            with single_blas_thread(), parallel_chunksize(1):
                _traverse(self.metric, self.kernel_id, self.variance, self.kerr, self.eps_d, self.gam, self.tnorm,
                          self.tile_size, self.pop_batch, self.blk_cap, tr.node_start, tr.node_end, tr.node_left, tr.node_right,
                          tr.node_lo, tr.node_hi, tr.node_min, tr.node_ymin, tr.node_ymax,
                          tr.node_zeta, tr.node_zabs, tr.roots, tr.root_lo, self.pidx, self.pxt, self.pip,
                          self.didx, self.dxt, self.dip, self.dv, self.inv_scale, qx_o, qv_o, qip_o, qrn_o,
                          qna_o, qmarg_o, qfloor_o, qself_o, qlim_o, heap_a, heap_i, count, a_dropped, kth_a, kth_n,
                          counters, self.sequential, qp_o, self.pp, self.dp, self.scale, qv_fast, self.pv_fast, qa_fast,
                          self.mid_fast, self.rad_fast, self.gam_prod, self.flags.order == "bound",
                          lf_slot, lf_rank, lf_basis, lf_coef, lf_tail, lf_under, lf_tail_median, qw)
        inv = np.empty(q, dtype=np.int64)
        inv[order] = np.arange(q)
        totals = {name: int(counters[:, c].max() if name in ("frontier_max", "block_pairs_max") else counters[:, c].sum())
                  for c, name in enumerate(COUNTERS)}
        return heap_a[inv], heap_i[inv], a_dropped[inv], totals

    def node_bounds(self, qx: np.ndarray, qv: np.ndarray, qp: np.ndarray, fast: bool = False) -> np.ndarray:
        """U[i, node]: the traversal's upper bound on |rho| between query i and every point of
        the node (the residual metric; for tests and docs/tree.md). ``fast``: with the bound
        products in the leaf precision, as the traversal computes them (float64 otherwise)."""
        qa, qrn, qna = self.query_factors(qv)
        if fast:
            qa_f = qa.astype(self.mid_fast.dtype)
            s0 = (qa_f @ self.mid_fast.T).astype(np.float64)
            sr = (np.abs(qa_f) @ self.rad_fast.T).astype(np.float64)
            gam_prod = self.gam_prod
        else:
            s0 = np.ascontiguousarray(qa @ self.mid.T)
            sr = np.ascontiguousarray(np.abs(qa) @ self.rad.T)
            gam_prod = self.gam
        tr = self.tree
        out = np.empty((qx.shape[0], tr.nodes))
        _bound_matrix(self.kernel_id, self.variance, self.kerr, self.eps_d, self.gam, gam_prod, self.tnorm, tr.node_lo,
                      tr.node_hi, tr.node_ymin, tr.node_ymax, tr.node_zeta, tr.node_zabs, s0, sr,
                      np.ascontiguousarray(qx), self.inv_scale, 1.0 / np.sqrt(qp), qrn, qna, out)
        return out

    def query_groups(self, batch: QueryBatch, size: int) -> list:
        """Rows of ``batch`` in groups of at most ``size``, each spatially compact.

        Queries are grouped by the index block their limit falls in (so a group shares its
        fully admissible trees), ordered along the Hilbert curve within a block, and each
        block's run is cut into near-equal groups. search.exact_knn then sees compact
        chunks, and a tile of the traversal compact queries.
        """
        tr = self.tree
        upper = np.append(tr.root_lo[1:], np.iinfo(np.int64).max) if tr.root_lo.size else np.zeros(1, np.int64)
        block = np.searchsorted(upper, batch.limit, side="left")
        keys = hilbert_order(batch.coords * self.inv_scale, *self.box) if batch.size > 1 else np.arange(batch.size)
        rank = np.empty(batch.size, dtype=np.int64)
        rank[keys] = np.arange(batch.size)
        order = np.lexsort((rank, block))
        groups = []
        bounds = np.flatnonzero(np.diff(block[order])) + 1
        for run in np.split(order, bounds):
            pieces = max(1, -(-run.size // size))
            groups.extend(np.array_split(run, pieces))
        return [g for g in groups if g.size]

    def _float32_margins(self, v_norms, p) -> np.ndarray:
        """The extra margin of float32 leaf blocks (precision.float32_margins) over the tree's points."""
        return float32_margins(v_norms, p, self.w_max_tree, self.ip_max_tree, self.m, self.inv_scale.size,
                               self.variance)

    def margins(self, batch: QueryBatch, routed: np.ndarray | None = None) -> np.ndarray:
        """Rounding margins covering every fast value this searcher computes for the queries:
        the float64 path's (search.exact_knn's), plus float32's where the leaves use it, except
        on the rows ``routed`` to the backend's brute force (float64 only)."""
        e = query_margins(batch.v_norms, batch.p, self.w_max, self.ip_max, self.m,
                          self.inv_scale.size, self.variance)
        if self.leaf_precision == "float32":
            extra = self._float32_margins(batch.v_norms, batch.p)
            if routed is not None:
                extra[routed] = 0.0
            e = e + extra
        return e

    def routed(self, batch: QueryBatch) -> np.ndarray:
        """Queries the tree leaves to float64 brute force: p below the dense cut (vacuous bounds),
        or, with float32 leaves, a float32 margin above FLOAT32_MAX_MARGIN. None in the
        sequential (parity) mode: the oracle has only the tree."""
        if self.sequential:
            return np.zeros(batch.size, dtype=np.bool_)
        out = batch.p < self.tree.dense_cut
        if self.leaf_precision == "float32":
            out |= self._float32_margins(batch.v_norms, batch.p) > FLOAT32_MAX_MARGIN
        return out

    def select(self, batch: QueryBatch, keep: int, brute_select=None, telemetry=None, k: int | None = None
               ) -> Candidates:
        """Candidates for a sub-batch (residual metric); queries with tiny p (or, with float32
        leaves, a float32 margin above FLOAT32_MAX_MARGIN) go to ``brute_select``.

        ``k``: the number of neighbours being certified (pruning then uses the k-th largest
        value; without it, the keep-th).
        """
        t0 = time.perf_counter()
        to_brute = self.routed(batch) if brute_select is not None else np.zeros(batch.size, dtype=np.bool_)
        tree_rows = np.flatnonzero(~to_brute)
        q = batch.size
        # the tree's rows may have float32 leaf values; the routed rows have float64 ones only
        margin = self.margins(batch, to_brute)
        index = np.full((q, keep), -1, dtype=np.int64)
        abs_rho = np.full((q, keep), -1.0)
        a_dropped = np.full(q, -1.0)
        evaluations = 0
        if tree_rows.size:
            sub = batch.take(tree_rows) if tree_rows.size < q else batch
            qa, qrn, qna = self.query_factors(sub.v)  # one BLAS thread per Numba thread (_blas.py)
            t1 = time.perf_counter()
            sub_margin = margin[tree_rows]
            qfloor = None if sub.floor is None else floor_thresholds(sub.floor, sub_margin)
            run = self.run if self.schedule is None else self.schedule.run
            ha, hi, ad, totals = run(sub.coords, sub.v, sub.p, sub.self_index, sub.limit, keep,
                                          qa, qrn, qna, k=k, qmarg=None if k is None else sub_margin, qfloor=qfloor)
            index[tree_rows] = hi
            abs_rho[tree_rows] = ha
            a_dropped[tree_rows] = ad
            evaluations += totals["block_pairs"]
            if telemetry is not None:
                telemetry.add_tree(totals)
                telemetry.tree_queries += int(tree_rows.size)
                telemetry.add_seconds("tree_query_factors", t1 - t0)
                telemetry.add_seconds("tree_traverse", time.perf_counter() - t1)
        brute_rows = np.flatnonzero(to_brute)
        if brute_rows.size:
            t2 = time.perf_counter()
            cand = brute_select(batch.take(brute_rows), keep)
            index[brute_rows] = cand.index
            abs_rho[brute_rows] = cand.abs_rho
            a_dropped[brute_rows] = cand.a_dropped
            evaluations += cand.evaluations
            if telemetry is not None:
                telemetry.brute_queries += int(brute_rows.size)
                telemetry.brute_evaluations += int(cand.evaluations)
                telemetry.add_seconds("brute_select", time.perf_counter() - t2)
        return Candidates(index=index, abs_rho=abs_rho, a_dropped=a_dropped, evaluations=int(evaluations),
                          margin=margin)


def euclidean_search(tree, coords, k: int, queries=None, query_coords=None, tile_size: int = DEFAULT_TILE_SIZE):
    """kNN in plain Euclidean distance: (indices, distances), ascending, ties to the smaller index."""
    from .._validation import as_float_matrix, as_index_array, as_int

    n, d = coords.shape
    searcher = TreeSearcher(tree, coords, tile_size=tile_size)
    if query_coords is not None:
        if queries is not None:
            raise ValueError("pass either queries= or query_coords=, not both")
        qx = as_float_matrix(query_coords, "query_coords", ncols=d)
        qself = np.full(qx.shape[0], -1, dtype=np.int64)
        k = as_int(k, "k", low=1, high=n)
    else:
        ids = np.arange(n, dtype=np.int64) if queries is None else as_index_array(queries, "queries", n=n)
        qx = np.ascontiguousarray(coords[ids])
        qself = ids
        k = as_int(k, "k", low=1, high=max(n - 1, 1))
    q = qx.shape[0]
    ha, hi, _, _ = searcher.run(qx, np.zeros((q, 0)), np.ones(q), qself, np.full(q, n, dtype=np.int64), k)
    dist2 = -ha
    # rank by (distance, index)
    order = np.lexsort((hi, dist2), axis=1) if q else np.zeros((0, k), dtype=np.int64)
    idx = np.take_along_axis(hi, order, axis=1)
    dist = np.sqrt(np.take_along_axis(dist2, order, axis=1))
    return idx, dist
