"""Batched exact traversal of the search forest (residual and Euclidean metrics).

``TreeSearcher.select(batch, keep)`` has the contract of ``search.exact_knn``'s select: per
query the ``keep`` admissible candidates of largest fast |rho| among those it evaluated, and
``a_dropped``, an upper bound on |rho| of every admissible candidate it did not keep. Pruning
a (query, node) pair is a drop with the node's bound U_q (docs/tree.md), so certification
(certify.py) proves the final top k exactly as for brute force.

Per tile of ``tile_size`` queries consecutive in Hilbert order (one Numba task per tile):

1. the dense points (tiny p, kept out of the tree) are evaluated as one tile x dense block;
2. the roots of the blocks with admissible points are bounded and pushed on the tile's
   frontier, a min-heap keyed by (scaled squared box distance between the tile's and the
   node's coordinate boxes, node size, node id);
3. rounds: pop up to ``POP_BATCH`` entries; per entry, a query whose stored bound is below
   its current threshold (the keep-th largest kept value, once it holds ``keep``) drops the
   node (a_dropped = max(a_dropped, U_q)); the others are *alive*. A leaf is evaluated at
   once as one (alive queries x admissible prefix of the leaf) block: a GEMM of V rows, then
   the fused kernel transform of the CPU backend and heap pushes. An internal node's
   children are queued with the parent's alive mask; after the pops, the queued children
   are bounded together (one (tile x m) @ (m x children) GEMM for a_q . mid and one for
   |a_q| . rad), pruned per query, and pushed.

Counters are summed over tiles into the Telemetry (see docs/telemetry.md).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from numba import njit, parallel_chunksize, prange

from .._numba_math import row_norms
from ..backends.base import Candidates, QueryBatch
from ..backends.cpu import _block_width, _eval_block, _fold_block, _mostly_alive, single_blas_thread
from ..certify import floor_thresholds
from ..errors import InvalidArgumentError
from ..hilbert import hilbert_order
from ..precision import FLOAT32_MAX_MARGIN, candidate_maxima, float32_margins, gamma, kernel_error, query_margins
from .bounds import _bound_matrix, _sequential_products, box_distances, query_factors, residual_bound

#: queries per tile (one Numba task each)
DEFAULT_TILE_SIZE = 128
#: frontier entries popped per round; their children are bounded by one GEMM
POP_BATCH = 8
_U = 2.0**-53
NOADM = -np.inf

COUNTERS = ("nodes_visited", "bound_evaluations", "bound_products", "prunes_bound", "prunes_predecessor",
            "frontier_sum", "frontier_max", "rounds", "yields", "blocks", "block_pairs",
            "block_pairs_max", "leaves_evaluated", "dense_pairs")
(C_NODES, C_BOUND_EVALS, C_BOUND_PRODUCTS, C_PRUNE_BOUND, C_PRUNE_PRED, C_FRONTIER_SUM, C_FRONTIER_MAX,
 C_ROUNDS, C_YIELDS, C_BLOCKS, C_PAIRS, C_PAIRS_MAX, C_LEAVES, C_DENSE_PAIRS) = range(len(COUNTERS))
NCOUNTERS = len(COUNTERS)


# --------------------------------------------------------------------------------------
# frontier: a binary min-heap on (key, size, node) with a slot into a pool of bound rows
# --------------------------------------------------------------------------------------
@njit(inline="always", cache=True)
def _fr_less(fk, fs, fn, i, j):
    if fk[i] != fk[j]:
        return fk[i] < fk[j]
    if fs[i] != fs[j]:
        return fs[i] < fs[j]
    return fn[i] < fn[j]


@njit(inline="always", cache=True)
def _fr_swap(fk, fs, fn, fslot, i, j):
    fk[i], fk[j] = fk[j], fk[i]
    fs[i], fs[j] = fs[j], fs[i]
    fn[i], fn[j] = fn[j], fn[i]
    fslot[i], fslot[j] = fslot[j], fslot[i]


@njit(cache=True, fastmath=False)
def _fr_push(fk, fs, fn, fslot, size, key, nsize, node, slot):
    pos = size
    fk[pos] = key
    fs[pos] = nsize
    fn[pos] = node
    fslot[pos] = slot
    while pos > 0:
        parent = (pos - 1) // 2
        if not _fr_less(fk, fs, fn, pos, parent):
            break
        _fr_swap(fk, fs, fn, fslot, pos, parent)
        pos = parent


@njit(cache=True, fastmath=False)
def _fr_pop(fk, fs, fn, fslot, size):
    """Remove the root (the caller read it); ``size`` is the size before removal."""
    last = size - 1
    _fr_swap(fk, fs, fn, fslot, 0, last)
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= last:
            break
        if child + 1 < last and _fr_less(fk, fs, fn, child + 1, child):
            child += 1
        if not _fr_less(fk, fs, fn, child, pos):
            break
        _fr_swap(fk, fs, fn, fslot, child, pos)
        pos = child


@njit(cache=True, fastmath=False)
def _fr_grow(fk, fs, fn, fslot, pool):
    """Twice the capacity; the new slots (all free) are returned as the free list."""
    cap = fk.shape[0]
    ncap = 2 * cap
    fk2 = np.empty(ncap)
    fs2 = np.empty(ncap, dtype=np.int64)
    fn2 = np.empty(ncap, dtype=np.int64)
    fslot2 = np.empty(ncap, dtype=np.int64)
    pool2 = np.empty((ncap, pool.shape[1]))
    fk2[:cap] = fk
    fs2[:cap] = fs
    fn2[:cap] = fn
    fslot2[:cap] = fslot
    pool2[:cap] = pool
    free2 = np.empty(ncap, dtype=np.int64)
    for i in range(cap):
        free2[i] = ncap - 1 - i
    return fk2, fs2, fn2, fslot2, pool2, free2


@njit(inline="always", cache=True)
def _box_key(tlo, thi, lo, hi, inv_scale):
    """Scaled squared distance between the tile's box and a node's box."""
    s = 0.0
    for t in range(tlo.shape[0]):
        gap = lo[t] - thi[t]
        g2 = tlo[t] - hi[t]
        gap = max(gap, g2)
        if gap > 0.0:
            gap *= inv_scale[t]
            s += gap * gap
    return s


@njit(inline="always", cache=True)
def _threshold(heap_a, count, kth_a, kth_n, qmarg, qfloor, r):
    """Pruning threshold of row r.

    Residual metric: the k-th largest value evaluated so far minus twice the row's rounding
    margin, once k values are known (a drop below it always passes certification, which
    compares the dropped maximum with the final k-th value, both widened by the margin), and
    at least the row's floor threshold (certify.floor_thresholds; -inf without a floor).
    Euclidean metric (``kth_a`` has no columns): the smallest kept value once the heap is full.
    """
    if kth_a.shape[1] == 0:
        if count[r] == heap_a.shape[1]:
            return heap_a[r, 0]
        return -np.inf
    if kth_n[r] == kth_a.shape[1]:
        return max(kth_a[r, 0] - 2.0 * qmarg[r], qfloor[r])
    return qfloor[r]


# --------------------------------------------------------------------------------------
# the traversal
# --------------------------------------------------------------------------------------
@njit(cache=True, fastmath=False)  # no FMA contraction: the parity preset's bounds must round as written
def _traverse_tile(tile, metric, kernel_id, variance, kerr, eps_d, gam, tnorm, tile_size, pop_batch, blk_cap,
                   node_start, node_end, node_left, node_right, node_lo, node_hi, node_min,
                   node_ymin, node_ymax, node_zeta, node_zabs, roots, root_lo,
                   pidx, pxt, pip, didx, dxt, dip, dv, inv_scale,
                   qx, qv, qip, qrn, qna, qmarg, qfloor, qself, qlimit,
                   heap_a, heap_i, count, a_dropped, kth_a, kth_n, counters, sequential, qp, pp, dp, scale,
                   qv_fast, pv_fast, qa_fast, mid_fast, rad_fast, gam_prod, order_by_bound):
    """One tile of queries: rows [tile * tile_size, ...) of the query arrays (see the module docstring)."""
    q = qx.shape[0]
    d = qx.shape[1]
    m = qv.shape[1]
    r0 = tile * tile_size
    r1 = min(r0 + tile_size, q)
    nt = r1 - r0
    ctr = counters[tile]
    row = np.empty(blk_cap)
    work = np.empty((3, blk_cap))
    qbuf = np.empty((nt, max(m, 1)))
    qbuf_fast = np.empty((nt, max(m, 1)), dtype=qv_fast.dtype)
    rows = np.empty(nt, dtype=np.int64)
    # tile box (raw coordinates) for the frontier key
    tlo = np.empty(d)
    thi = np.empty(d)
    for t in range(d):
        tlo[t] = qx[r0, t]
        thi[t] = qx[r0, t]
    for r in range(r0, r1):
        for t in range(d):
            tlo[t] = min(tlo[t], qx[r, t])
            thi[t] = max(thi[t], qx[r, t])
    # 1. dense points: one block for the whole tile
    if didx.shape[0] > 0:
        zero = np.int64(r0 - r0)  # a plain int64 (a literal 0 would compile a second specialisation)
        for i in range(nt):
            rows[i] = i
        pairs = _eval_block(metric, kernel_id, variance, rows, nt, r0, zero, didx.shape[0], didx, dxt, dip, dv,
                            qx, qv, inv_scale, qip, qself, qlimit, heap_a, heap_i, count, a_dropped, kth_a, kth_n,
                            qbuf, row, work, sequential, qp, dp, scale)
        if pairs > 0:
            ctr[C_BLOCKS] += 1
            ctr[C_PAIRS] += pairs
            ctr[C_DENSE_PAIRS] += pairs
            ctr[C_PAIRS_MAX] = max(ctr[C_PAIRS_MAX], pairs)
    if roots.shape[0] == 0:
        return
    amat = qa_fast[r0:r1]  # float32 with float32 leaves (the bound's gam_prod covers it)
    absa = np.abs(amat)
    # 2. frontier and expansion buffers
    cap = 64
    fk = np.empty(cap)
    fs = np.empty(cap, dtype=np.int64)
    fn = np.empty(cap, dtype=np.int64)
    fslot = np.empty(cap, dtype=np.int64)
    pool = np.empty((cap, nt))
    free = np.empty(cap, dtype=np.int64)
    for i in range(cap):
        free[i] = cap - 1 - i
    nfree = cap
    fsize = 0
    ecap = max(2 * pop_batch, roots.shape[0])
    enode = np.empty(ecap, dtype=np.int64)
    emask = np.zeros((ecap, nt), dtype=np.bool_)
    midbuf = np.empty((ecap, max(m, 1)), dtype=mid_fast.dtype)
    radbuf = np.empty((ecap, max(m, 1)), dtype=mid_fast.dtype)
    ub = np.empty(nt)
    ne = 0
    # a round's mostly-alive leaves (see _mostly_alive) are evaluated together: their points'
    # V rows copied side by side into lbuf, one GEMM against all tile rows (wider than one leaf,
    # and the tile rows are packed once)
    batched = metric == 0 and not sequential
    pcap = pop_batch if batched else 0
    lbuf = np.empty((pcap * blk_cap, max(m, 1)), dtype=pv_fast.dtype)
    pnode = np.empty(pcap, dtype=np.int64)
    pcol = np.empty(pcap, dtype=np.int64)
    pnrows = np.empty(pcap, dtype=np.int64)
    prows = np.empty((pcap, nt), dtype=np.int64)
    for b in range(roots.shape[0]):
        any_adm = False
        for i in range(nt):
            adm = root_lo[b] < qlimit[r0 + i]
            emask[ne, i] = adm
            if adm:
                any_adm = True
            else:
                ctr[C_PRUNE_PRED] += 1
        if any_adm:
            enode[ne] = roots[b]
            ne += 1
    while True:
        # 3a. bound the queued nodes, prune per query, push the survivors
        if ne > 0:
            ctr[C_NODES] += ne
            ctr[C_BOUND_EVALS] += ne * nt
            if metric == 0:
                for e in range(ne):
                    nd = enode[e]
                    for t in range(m):
                        midbuf[e, t] = mid_fast[nd, t]
                        radbuf[e, t] = rad_fast[nd, t]
                if sequential:
                    s0, sr = _sequential_products(amat, absa, midbuf[:ne], radbuf[:ne])
                else:
                    s0 = np.dot(amat, midbuf[:ne].T)
                    sr = np.dot(absa, radbuf[:ne].T)
                ctr[C_BOUND_PRODUCTS] += 2 * ne * nt
            else:
                s0 = np.zeros((nt, ne), dtype=midbuf.dtype)
                sr = s0
            for e in range(ne):
                nd = enode[e]
                alive = False
                for i in range(nt):
                    r = r0 + i
                    if not emask[e, i]:
                        ub[i] = NOADM
                        continue
                    if node_min[nd] >= qlimit[r]:
                        ub[i] = NOADM
                        ctr[C_PRUNE_PRED] += 1
                        continue
                    if metric == 0:
                        u = residual_bound(kernel_id, variance, kerr, eps_d, gam, gam_prod, tnorm, qx[r], inv_scale,
                                           qip[r], qrn[r], qna[r], node_lo[nd], node_hi[nd], node_ymin[nd],
                                           node_ymax[nd], node_zeta[nd], node_zabs[nd], s0[i, e], sr[i, e])
                    else:
                        u = -box_distances(qx[r], inv_scale, node_lo[nd], node_hi[nd])[0]
                    if u < _threshold(heap_a, count, kth_a, kth_n, qmarg, qfloor, r):
                        a_dropped[r] = max(a_dropped[r], u)
                        ctr[C_PRUNE_BOUND] += 1
                        ub[i] = NOADM
                        continue
                    ub[i] = u
                    alive = True
                if not alive:
                    continue
                if nfree == 0:  # grow the frontier and its pool
                    fk, fs, fn, fslot, pool, free = _fr_grow(fk, fs, fn, fslot, pool)
                    nfree = cap
                    cap *= 2
                nfree -= 1
                slot = free[nfree]
                for i in range(nt):
                    pool[slot, i] = ub[i]
                if order_by_bound:  # TraversalFlags.order: the largest bound of an alive row first
                    key = -np.inf
                    for i in range(nt):
                        key = max(key, ub[i])
                    key = -key
                else:
                    key = _box_key(tlo, thi, node_lo[nd], node_hi[nd], inv_scale)
                _fr_push(fk, fs, fn, fslot, fsize, key, node_end[nd] - node_start[nd], nd, slot)
                fsize += 1
            ne = 0
        if fsize == 0:
            break
        # 3b. pop a batch: evaluate leaves now, queue internal nodes' children
        ctr[C_ROUNDS] += 1
        ctr[C_FRONTIER_SUM] += fsize
        ctr[C_FRONTIER_MAX] = max(ctr[C_FRONTIER_MAX], fsize)
        had_leaf = False
        npend = 0
        pw = 0
        for _ in range(pop_batch):
            if fsize == 0:
                break
            nd = fn[0]
            slot = fslot[0]
            _fr_pop(fk, fs, fn, fslot, fsize)
            fsize -= 1
            free[nfree] = slot
            nfree += 1
            nalive = 0
            for i in range(nt):
                u = pool[slot, i]
                if u == NOADM:
                    continue
                r = r0 + i
                if u < _threshold(heap_a, count, kth_a, kth_n, qmarg, qfloor, r):
                    a_dropped[r] = max(a_dropped[r], u)
                    ctr[C_PRUNE_BOUND] += 1
                    continue
                rows[nalive] = i
                nalive += 1
            if nalive == 0:
                continue
            if node_left[nd] < 0:
                start = node_start[nd]
                if batched and _mostly_alive(nalive, nt):
                    width = _block_width(pidx, start, node_end[nd], qlimit, r0, rows, nalive)
                    if width > 0:
                        lbuf[pw:pw + width] = pv_fast[start:start + width]
                        pnode[npend] = nd
                        pcol[npend] = pw
                        pnrows[npend] = nalive
                        prows[npend, :nalive] = rows[:nalive]
                        pw += width
                        npend += 1
                    pairs = nalive * width
                else:
                    # the leaves' fast values may run in float32 (qv_fast, pv_fast); the dense block never does
                    pairs = _eval_block(metric, kernel_id, variance, rows, np.int64(nalive), r0, start, node_end[nd],
                                        pidx, pxt, pip, pv_fast, qx, qv_fast, inv_scale, qip, qself, qlimit, heap_a,
                                        heap_i, count, a_dropped, kth_a, kth_n, qbuf_fast, row, work, sequential, qp,
                                        pp, scale)
                had_leaf = True
                ctr[C_LEAVES] += 1
                if pairs > 0:
                    ctr[C_BLOCKS] += 1
                    ctr[C_PAIRS] += pairs
                    ctr[C_PAIRS_MAX] = max(ctr[C_PAIRS_MAX], pairs)
            else:
                for child in (node_left[nd], node_right[nd]):
                    enode[ne] = child
                    for i in range(nt):
                        emask[ne, i] = False
                    for a in range(nalive):
                        emask[ne, rows[a]] = True
                    ne += 1
        if npend > 0:
            g = np.dot(qv_fast[r0:r1], lbuf[:pw].T)
            for e in range(npend):
                nd = pnode[e]
                _fold_block(metric, kernel_id, variance, prows[e], pnrows[e], r0, node_start[nd], node_end[nd], pidx,
                            pxt, pip, pv_fast, qx, qv_fast, inv_scale, qip, qself, qlimit, heap_a, heap_i, count,
                            a_dropped, kth_a, kth_n, row, work, sequential, qp, pp, scale, g, True, pcol[e])
        if had_leaf:
            ctr[C_YIELDS] += 1


@njit(parallel=True, cache=True, fastmath=False)
def _traverse(metric, kernel_id, variance, kerr, eps_d, gam, tnorm, tile_size, pop_batch, blk_cap,
              node_start, node_end, node_left, node_right, node_lo, node_hi, node_min,
              node_ymin, node_ymax, node_zeta, node_zabs, roots, root_lo,
              pidx, pxt, pip, didx, dxt, dip, dv, inv_scale,
              qx, qv, qip, qrn, qna, qmarg, qfloor, qself, qlimit,
              heap_a, heap_i, count, a_dropped, kth_a, kth_n, counters, sequential, qp, pp, dp, scale,
              qv_fast, pv_fast, qa_fast, mid_fast, rad_fast, gam_prod, order_by_bound):
    """All tiles, one Numba task each (dynamic scheduling: tiles differ in cost)."""
    ntiles = (qx.shape[0] + tile_size - 1) // tile_size
    for tile in prange(ntiles):
        _traverse_tile(np.int64(tile), metric, kernel_id, variance, kerr, eps_d, gam, tnorm, tile_size, pop_batch, blk_cap,
                       node_start, node_end, node_left, node_right, node_lo, node_hi, node_min,
                       node_ymin, node_ymax, node_zeta, node_zabs, roots, root_lo,
                       pidx, pxt, pip, didx, dxt, dip, dv, inv_scale,
                       qx, qv, qip, qrn, qna, qmarg, qfloor, qself, qlimit,
                       heap_a, heap_i, count, a_dropped, kth_a, kth_n, counters, sequential, qp, pp, dp, scale,
                       qv_fast, pv_fast, qa_fast, mid_fast, rad_fast, gam_prod, order_by_bound)


@njit(parallel=True, cache=True, fastmath=False)
def _gather_rows(src, rows, out):
    """out[i] = src[rows[i]], cast to out's dtype, in one pass (V in tree order)."""
    for i in prange(rows.shape[0]):
        for t in range(src.shape[1]):
            out[i, t] = src[rows[i], t]
    return out


# --------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TraversalFlags:
    """The traversal's scheduling choices (issue #13's heuristics), each off by default until a
    benchmark shows it winning (docs/benchmarks.md, "Traversal flags"). None changes an answer:
    every drop is still a proven bound, and certification is unchanged; the tests check the
    bits with each flag on.

    order: the frontier's key: "box" (scaled squared distance between the tile's and the node's
    coordinate boxes, then node size and id) or "bound" (the node's largest bound over the
    tile's alive rows first, then node size and id).
    """

    order: str = "box"

    def __post_init__(self):
        if self.order not in ("box", "bound"):
            raise InvalidArgumentError(f"TraversalFlags.order must be 'box' or 'bound', got order={self.order!r}")


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
                          self.mid_fast, self.rad_fast, self.gam_prod, self.flags.order == "bound")
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
            qa, qrn, qna = self.query_factors(sub.v)
            t1 = time.perf_counter()
            sub_margin = margin[tree_rows]
            qfloor = None if sub.floor is None else floor_thresholds(sub.floor, sub_margin)
            ha, hi, ad, totals = self.run(sub.coords, sub.v, sub.p, sub.self_index, sub.limit, keep,
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
