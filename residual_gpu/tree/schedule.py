"""The tree's select as a few large backend requests (any backend): seed, bound, sweep.

The fused CPU traversal (traversal._traverse_tile) interleaves bounds and leaf blocks in
hundreds of small rounds per tile, which a device would pay a round trip for each. This
schedule asks the backend for three things per chunk of queries, whatever the backend:

1. **seed**: per query tile (``tile_size`` queries consecutive in Hilbert order), the dense
   points and the ``seed_leaves`` leaves nearest the tile's coordinate box (the traversal's
   own first choices), one ``select_blocks`` request each. Their k-th largest value per query,
   less twice its rounding margin, is the query's pruning threshold (and at least its floor
   threshold), exactly as the fused traversal's ``_threshold``;
2. **bound**: every (query, admissible leaf) pair bounded by the leaves' node bound U_q
   (docs/tree.md, "The bound"): one ``bound_products`` request (two GEMMs against the leaves'
   summaries) and the bound's scalar part on the host (bounds._bound_matrix);
3. **sweep**: per tile, every leaf that some query of the tile cannot prune (U >= threshold),
   one more ``select_blocks`` request for all tiles.

A pair neither seeded nor swept is dropped with its bound, so the select keeps the tree's
contract (searcher.TreeSearcher.select) and certification proves the same answers bit for
bit. The leaves are bounded flat, without the hierarchy: that is q x leaves bounds, which the
fused traversal beats at large n (docs/tree.md section 4b).
"""

from __future__ import annotations

import numpy as np

from ..backends.base import BlockList, Candidates, QueryBatch
from ..brute import merge_candidates
from ..hilbert import hilbert_order
from ..problem import ProblemView
from .bounds import _bound_matrix
from .traversal import COUNTERS, NOADM

#: queries per tile: a tile evaluates its leaves for all of its rows (smaller tiles evaluate
#: fewer pairs that a row alone would have pruned; larger ones make wider GEMMs)
BLOCK_TILE_SIZE = 64
#: leaves per tile evaluated before any bound (nearest by box distance)
SEED_LEAVES = 16
#: (query, leaf) bounds held at once: a chunk's rows are bounded in pieces of whole tiles
BOUND_ENTRIES = 1 << 22


class BlockSchedule:
    """A TreeSearcher's select through ``backend``'s block requests (see the module docstring)."""

    def __init__(self, searcher, backend, problem, tile_size: int = BLOCK_TILE_SIZE,
                 seed_leaves: int = SEED_LEAVES):
        tree = searcher.tree
        self.searcher = searcher
        self.backend = backend
        self.tile_size = int(tile_size)
        self.seed_leaves = int(seed_leaves)
        leaves = np.flatnonzero(tree.node_left < 0)
        self.leaves = leaves[np.argsort(tree.node_start[leaves], kind="stable")]
        self.leaf_start = tree.node_start[self.leaves]
        self.leaf_end = tree.node_end[self.leaves]
        self.leaf_min = tree.node_min[self.leaves]
        self.leaf_lo = np.ascontiguousarray(tree.node_lo[self.leaves])
        self.leaf_hi = np.ascontiguousarray(tree.node_hi[self.leaves])
        self._leaf_summary = tuple(np.ascontiguousarray(a[self.leaves]) for a in (
            tree.node_ymin, tree.node_ymax, tree.node_zeta, tree.node_zabs))
        fast = searcher.pv_fast.dtype
        # the tree's points in tree order (each leaf a contiguous range) in the leaf precision,
        # and the dense points in float64, as the fused traversal evaluates them
        self.tree_ids = tree.perm
        self.tree_points = backend.prepare(ProblemView(problem, tree.perm, fast))
        self.dense_ids = tree.dense
        self.dense_points = backend.prepare(ProblemView(problem, tree.dense)) if tree.dense.size else None
        self.bounds = backend.prepare_bounds(searcher.mid_fast[self.leaves], searcher.rad_fast[self.leaves])

    # -- the three requests ------------------------------------------------------------
    def _leaf_bounds(self, qx, qip, qa, qrn, qna, qlimit) -> np.ndarray:
        """U (q, leaves): the node bound of every (query, leaf) pair, NOADM where inadmissible."""
        s = self.searcher
        s0, sr = self.backend.bound_products(self.bounds, qa)  # in the summaries' precision
        out = np.empty(s0.shape)
        _bound_matrix(s.kernel_id, s.variance, s.kerr, s.eps_d, s.gam, s.gam_prod, s.tnorm, self.leaf_lo, self.leaf_hi,
                      *self._leaf_summary, np.ascontiguousarray(s0), np.ascontiguousarray(sr), qx, s.inv_scale, qip,
                      qrn, qna, out)
        out[self.leaf_min[None, :] >= qlimit[:, None]] = NOADM
        return out

    def _seeds(self, qx, row_ptr, adm_tile) -> np.ndarray:
        """(tiles, leaves) bool: each tile's ``seed_leaves`` admissible leaves nearest its box."""
        s = self.searcher
        tiles = row_ptr.size - 1
        seed = np.zeros((tiles, self.leaves.size), dtype=np.bool_)
        for t in range(tiles):
            box = qx[row_ptr[t]:row_ptr[t + 1]]
            lo, hi = box.min(axis=0), box.max(axis=0)
            gap = np.maximum(np.maximum(self.leaf_lo - hi, lo - self.leaf_hi), 0.0) * s.inv_scale
            key = np.where(adm_tile[t], np.einsum("ld,ld->l", gap, gap), np.inf)
            near = np.argsort(key, kind="stable")[:self.seed_leaves]
            seed[t, near[np.isfinite(key[near])]] = True
        return seed

    def _blocks(self, row_ptr, chosen, alive=None) -> BlockList:
        """The BlockList of the leaves ``chosen`` (tiles, leaves) per tile, touching leaves merged
        into one range (leaves are in tree order, so neighbours in space often touch). With
        ``alive`` (rows, leaves), each range names the rows alive for one of its leaves."""
        starts, ends, range_ptr, rows_ptr, rows = [], [], [0], [np.zeros(1, np.int64)], []
        for t in range(chosen.shape[0]):
            pick = np.flatnonzero(chosen[t])
            if pick.size == 0:
                range_ptr.append(range_ptr[-1])
                continue
            a, b = self.leaf_start[pick], self.leaf_end[pick]
            new = np.ones(pick.size, dtype=np.bool_)
            new[1:] = a[1:] != b[:-1]
            first = np.flatnonzero(new)
            starts.append(a[first])
            ends.append(np.maximum.reduceat(b, first))
            range_ptr.append(range_ptr[-1] + first.size)
            if alive is not None:
                r0, r1 = row_ptr[t], row_ptr[t + 1]
                union = np.logical_or.reduceat(alive[r0:r1, pick], first, axis=1)  # (tile rows, ranges)
                run, row = np.nonzero(union.T)
                rows.append(r0 + row)
                rows_ptr.append(rows_ptr[-1][-1] + np.cumsum(np.bincount(run, minlength=first.size)))
        cat = lambda xs: np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, np.int64)
        return BlockList(np.asarray(row_ptr, dtype=np.int64), np.asarray(range_ptr, dtype=np.int64), cat(starts),
                         cat(ends), self.tree_ids, None if alive is None else cat(rows_ptr),
                         None if alive is None else cat(rows))

    # -- the select --------------------------------------------------------------------
    def run(self, qx, qv, qp, qself, qlimit, keep: int, qa=None, qrn=None, qna=None, k=None, qmarg=None,
            qfloor=None):
        """TreeSearcher.run's contract (residual metric): heaps, a_dropped and counter totals."""
        s = self.searcher
        q = qx.shape[0]
        order = hilbert_order(qx * s.inv_scale, *s.box) if q > 1 else np.arange(q)
        kk = keep if k is None else min(int(k), keep)
        qmarg = np.zeros(q) if qmarg is None else qmarg
        qfloor = np.full(q, -np.inf) if qfloor is None else qfloor
        heap_a = np.full((q, keep), -1.0)
        heap_i = np.full((q, keep), -1, dtype=np.int64)
        a_dropped = np.full(q, -1.0)
        totals = dict.fromkeys(COUNTERS, 0)
        ts = self.tile_size
        piece = max(ts, BOUND_ENTRIES // max(self.leaves.size, 1) // ts * ts)
        for p0 in range(0, q, piece):
            rows = order[p0:p0 + piece]
            ha, hi, ad = self._run_piece(rows, qx, qv, qp, qself, qlimit, keep, qa, qrn, qna, kk, qmarg, qfloor,
                                         totals)
            heap_a[rows], heap_i[rows], a_dropped[rows] = ha, hi, ad
        return heap_a, heap_i, a_dropped, totals

    def _run_piece(self, rows, qx, qv, qp, qself, qlimit, keep, qa, qrn, qna, kk, qmarg, qfloor, totals):
        s = self.searcher
        take = lambda a: np.ascontiguousarray(a[rows])
        n_rows = rows.size
        qx_o, qlim_o, qself_o = take(qx), take(qlimit), take(qself)
        qip_o = 1.0 / np.sqrt(take(qp))
        row_ptr = np.r_[np.arange(0, n_rows, self.tile_size), n_rows].astype(np.int64)
        tile_of = np.repeat(np.arange(row_ptr.size - 1), np.diff(row_ptr))
        batch64 = QueryBatch(qx_o, take(qv), take(qp), np.zeros(n_rows), qself_o, qlim_o)
        batch_fast = QueryBatch(qx_o, np.ascontiguousarray(batch64.v, dtype=s.pv_fast.dtype), batch64.p,
                                batch64.v_norms, qself_o, qlim_o)
        # 1. seed: the dense points, then the nearest leaves
        parts = []
        if self.dense_points is not None:
            ntiles = row_ptr.size - 1
            whole = BlockList(row_ptr, np.arange(ntiles + 1, dtype=np.int64), np.zeros(ntiles, np.int64),
                              np.full(ntiles, self.dense_ids.size, dtype=np.int64), self.dense_ids)
            parts.append(self.backend.select_blocks(self.dense_points, batch64, keep, whole))
            totals["dense_pairs"] += parts[0].evaluations
        ub = self._leaf_bounds(qx_o, qip_o, take(qa), take(qrn), take(qna), qlim_o)
        adm = ub != NOADM
        adm_tile = np.logical_or.reduceat(adm, row_ptr[:-1], axis=0)
        seed = self._seeds(qx_o, row_ptr, adm_tile)
        parts.append(self.backend.select_blocks(self.tree_points, batch_fast, keep, self._blocks(row_ptr, seed)))
        seed_pairs = sum(c.evaluations for c in parts)
        hi, ha, ad = merge_candidates(parts, keep)
        # 2. thresholds from what the seed found (traversal._threshold's rule)
        thr = qfloor[rows].copy()
        if kk > 0:
            full = np.count_nonzero(hi >= 0, axis=1) >= kk
            kth = -np.partition(-ha, kk - 1, axis=1)[:, kk - 1]
            thr[full] = np.maximum(kth[full] - 2.0 * qmarg[rows][full], thr[full])
        alive = adm & (ub >= thr[:, None])
        # 3. sweep: per tile, every leaf one of its rows cannot prune and the seed did not evaluate
        sweep = np.logical_or.reduceat(alive, row_ptr[:-1], axis=0) & ~seed
        evaluated = seed | sweep
        pruned = adm & ~evaluated[tile_of]  # dropped with their bound
        ad = np.maximum(ad, np.max(np.where(pruned, ub, -1.0), axis=1, initial=-1.0))
        swept = self.backend.select_blocks(self.tree_points, batch_fast, keep, self._blocks(row_ptr, sweep, alive))
        hi, ha, ad = merge_candidates([Candidates(hi, ha, ad, 0), swept], keep)
        n_adm = int(np.count_nonzero(adm))
        totals["nodes_visited"] += int(np.count_nonzero(adm_tile))
        totals["bound_evaluations"] += n_adm
        totals["bound_products"] += 2 * n_adm
        totals["prunes_bound"] += int(np.count_nonzero(pruned))
        totals["prunes_predecessor"] += adm.size - n_adm
        totals["rounds"] += 2 * (row_ptr.size - 1)
        leaf_blocks = int(np.count_nonzero(evaluated))  # (tile, leaf) blocks: each one leaf's block
        totals["blocks"] += leaf_blocks
        totals["leaves_evaluated"] += leaf_blocks
        totals["block_pairs"] += seed_pairs + swept.evaluations
        return ha, hi, ad
