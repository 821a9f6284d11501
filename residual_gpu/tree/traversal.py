"""Batched exact traversal of the search forest (residual and Euclidean metrics), on the device side.

``_traverse`` runs every tile of queries for ``TreeSearcher.run`` (searcher.py), which orders the
queries, computes their factors and gathers the results. Pruning a (query, node) pair is a drop
with the node's bound U_q (bounds.py, docs/tree.md section 2); a block the traversal does not
prune is computed by the CPU backend (backends/cpu.py, "the tree's leaf blocks").

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

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .._numba_gemm import gemm_nt
from ..backends.cpu import _eval_block, _filter_leaf
from ..errors import InvalidArgumentError
from .bounds import _sequential_products, box_distances, residual_bound

#: queries per tile (one Numba task each)
DEFAULT_TILE_SIZE = 128
#: frontier entries popped per round; their children are bounded by one GEMM
POP_BATCH = 8
#: the leaf filter's largest rank by default (TraversalFlags.filter_rank; each leaf takes 4, 8, ...
#: up to it, leaf_filter.TAIL_TARGET): 16 and 24 ran alike on `vif` 131072 (35.5 s, 34.8 s against
#: 44.8 s without), and 16 keeps the bases at ~1/3 of the float32 V rows' memory
FILTER_RANK = 16
NOADM = -np.inf

COUNTERS = ("nodes_visited", "bound_evaluations", "bound_products", "prunes_bound", "prunes_predecessor",
            "frontier_sum", "frontier_max", "rounds", "yields", "blocks", "block_pairs",
            "block_pairs_max", "leaves_evaluated", "dense_pairs", "filter_pairs", "filter_drops",
            "filter_products")
(C_NODES, C_BOUND_EVALS, C_BOUND_PRODUCTS, C_PRUNE_BOUND, C_PRUNE_PRED, C_FRONTIER_SUM, C_FRONTIER_MAX,
 C_ROUNDS, C_YIELDS, C_BLOCKS, C_PAIRS, C_PAIRS_MAX, C_LEAVES, C_DENSE_PAIRS, C_FILTER_PAIRS, C_FILTER_DROPS,
 C_FILTER_PRODUCTS) = range(len(COUNTERS))
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
# One function on purpose (~195 lines): it is one compiled task per tile (a prange iteration of
# _traverse) whose frontier heap, bound pool, expansion queue and scratch are its locals, shared
# by all its phases (1: dense block, 2: frontier and roots, 3a: bound, prune and push, 3b: pop
# and evaluate) and reallocated as the frontier grows (_fr_grow); helpers would pass and return
# a dozen of them. The leaf blocks are backends.cpu's (_eval_block, _fold_block), the bound is
# bounds.residual_bound, the frontier is the _fr_* heap above.
@njit(cache=True, fastmath=False)  # no FMA contraction: the parity preset's bounds must round as written
def _traverse_tile(tile, metric, kernel_id, variance, kerr, eps_d, gam, tnorm, tile_size, pop_batch, blk_cap,
                   node_start, node_end, node_left, node_right, node_lo, node_hi, node_min,
                   node_ymin, node_ymax, node_zeta, node_zabs, roots, root_lo,
                   pidx, pxt, pip, didx, dxt, dip, dv, inv_scale,
                   qx, qv, qip, qrn, qna, qmarg, qfloor, qself, qlimit,
                   heap_a, heap_i, count, a_dropped, kth_a, kth_n, counters, sequential, qp, pp, dp, scale,
                   qv_fast, pv_fast, qa_fast, mid_fast, rad_fast, gam_prod, order_by_bound,
                   lf_slot, lf_rank, lf_basis, lf_coef, lf_tail, lf_under, lf_tail_median, qw):
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
    rowth = np.empty(nt)  # the alive rows' thresholds at the pop (for the leaf filter)
    fstats = np.zeros(4, dtype=np.int64)
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
                    s0 = gemm_nt(amat, midbuf[:ne], np.empty((nt, ne), dtype=midbuf.dtype))
                    sr = gemm_nt(absa, radbuf[:ne], np.empty((nt, ne), dtype=midbuf.dtype))
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
                th = _threshold(heap_a, count, kth_a, kth_n, qmarg, qfloor, r)
                if u < th:
                    a_dropped[r] = max(a_dropped[r], u)
                    ctr[C_PRUNE_BOUND] += 1
                    continue
                rowth[i] = th
                rows[nalive] = i
                nalive += 1
            if nalive == 0:
                continue
            if node_left[nd] < 0:
                start = node_start[nd]
                nrest = np.int64(nalive)
                pairs = 0
                screened = 0
                if lf_slot.shape[0] > 0 and lf_slot[nd] >= 0:  # the low-rank leaf filter (leaf_filter.py)
                    fstats[:] = 0
                    nrest = _filter_leaf(kernel_id, variance, rows, nrest, r0, start, node_end[nd], lf_slot[nd], pidx,
                                         pxt, pip, pv_fast, qx, qv_fast, inv_scale, qip, qself, qlimit, heap_a,
                                         heap_i, count, a_dropped, kth_a, kth_n, qbuf_fast, row, work, lf_rank,
                                         lf_basis, lf_coef, lf_tail, lf_under, lf_tail_median, qw, rowth, fstats)
                    screened = fstats[0]
                    ctr[C_FILTER_PAIRS] += fstats[0]
                    ctr[C_FILTER_DROPS] += fstats[1]
                    ctr[C_FILTER_PRODUCTS] += fstats[3]
                    pairs += fstats[2]
                # the leaves' fast values may run in float32 (qv_fast, pv_fast); the dense block never does
                if nrest > 0:
                    pairs += _eval_block(metric, kernel_id, variance, rows, nrest, r0, start, node_end[nd],
                                         pidx, pxt, pip, pv_fast, qx, qv_fast, inv_scale, qip, qself, qlimit, heap_a,
                                         heap_i, count, a_dropped, kth_a, kth_n, qbuf_fast, row, work, sequential, qp,
                                         pp, scale)
                had_leaf = True
                ctr[C_LEAVES] += 1
                if pairs > 0 or screened > 0:  # a leaf the filter screened counts as one block
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
        if had_leaf:
            ctr[C_YIELDS] += 1


@njit(parallel=True, cache=True, fastmath=False)
def _traverse(metric, kernel_id, variance, kerr, eps_d, gam, tnorm, tile_size, pop_batch, blk_cap,
              node_start, node_end, node_left, node_right, node_lo, node_hi, node_min,
              node_ymin, node_ymax, node_zeta, node_zabs, roots, root_lo,
              pidx, pxt, pip, didx, dxt, dip, dv, inv_scale,
              qx, qv, qip, qrn, qna, qmarg, qfloor, qself, qlimit,
              heap_a, heap_i, count, a_dropped, kth_a, kth_n, counters, sequential, qp, pp, dp, scale,
              qv_fast, pv_fast, qa_fast, mid_fast, rad_fast, gam_prod, order_by_bound,
              lf_slot, lf_rank, lf_basis, lf_coef, lf_tail, lf_under, lf_tail_median, qw):
    """All tiles, one Numba task each (dynamic scheduling: tiles differ in cost)."""
    ntiles = (qx.shape[0] + tile_size - 1) // tile_size
    for tile in prange(ntiles):
        _traverse_tile(np.int64(tile), metric, kernel_id, variance, kerr, eps_d, gam, tnorm, tile_size, pop_batch, blk_cap,
                       node_start, node_end, node_left, node_right, node_lo, node_hi, node_min,
                       node_ymin, node_ymax, node_zeta, node_zabs, roots, root_lo,
                       pidx, pxt, pip, didx, dxt, dip, dv, inv_scale,
                       qx, qv, qip, qrn, qna, qmarg, qfloor, qself, qlimit,
                       heap_a, heap_i, count, a_dropped, kth_a, kth_n, counters, sequential, qp, pp, dp, scale,
                       qv_fast, pv_fast, qa_fast, mid_fast, rad_fast, gam_prod, order_by_bound,
                       lf_slot, lf_rank, lf_basis, lf_coef, lf_tail, lf_under, lf_tail_median, qw)


# --------------------------------------------------------------------------------------
# the scheduling choices (TreeSearcher passes flags.order == "bound" as order_by_bound)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TraversalFlags:
    """The traversal's scheduling choices (issue #13's heuristics), each off by default until a
    benchmark shows it winning (docs/benchmarks.md, "Traversal flags"; the leaf filter has). None
    changes an answer: every drop is still a proven bound, and certification is unchanged; the
    tests check the bits with each flag on and off.

    order: the frontier's key: "box" (scaled squared distance between the tile's and the node's
    coordinate boxes, then node size and id) or "bound" (the node's largest bound over the
    tile's alive rows first, then node size and id).

    schedule: "fused" (this module's Numba traversal, on the host: bounds and leaf blocks
    interleaved per tile), "blocks" (tree/schedule.py's BlockSchedule: seed, bound and sweep as a
    few large requests to the index's backend, which computes the blocks), or "auto": fused on
    the cpu backend and in the parity preset, blocks on every other backend.

    filter_rank: r > 0 screens the points of every evaluated leaf with a rank-(at most r)
    approximation of their V rows and a certified bound (tree/leaf_filter.py, docs/tree.md section
    4c) before their m-length products, in the fused traversal; 0 evaluates every point of the
    leaf. On by default (FILTER_RANK): 0.78-0.79x the query time at n = 131072 on `vif` and
    `spatial`, 0.98x at `vif` 32768.
    """

    order: str = "box"
    schedule: str = "auto"
    filter_rank: int = FILTER_RANK

    def __post_init__(self):
        if isinstance(self.filter_rank, bool) or not isinstance(self.filter_rank, (int, np.integer)) \
                or self.filter_rank < 0:
            raise InvalidArgumentError(f"TraversalFlags.filter_rank must be an int >= 0, got "
                                       f"filter_rank={self.filter_rank!r}")
        if self.order not in ("box", "bound"):
            raise InvalidArgumentError(f"TraversalFlags.order must be 'box' or 'bound', got order={self.order!r}")
        if self.schedule not in ("auto", "fused", "blocks"):
            raise InvalidArgumentError(f"TraversalFlags.schedule must be 'auto', 'fused' or 'blocks', got "
                                       f"schedule={self.schedule!r}")
