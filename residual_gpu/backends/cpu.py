"""CPU backend: BLAS GEMM for V_Q V_C^T and Numba for the fused transform and select.

Per (query tile, candidate tile) a GEMM writes G = V_Q V_C^T (in V's precision: float64, or
float32 for a float32 fast pass, whose transform then evaluates the correlation in float32 too,
as precision.float32_margins covers); one Numba pass per query row
then forms r^2 from direct coordinate differences, the kernel, a = |k - G| / sqrt(p_q p_j),
and pushes admissible candidates into that query's bounded min-heap. Each thread holds one
tile of G at a time, so memory is O(threads x tile) whatever n is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .._blas import single_blas_thread
from .._numba_gemm import gather_dots, gemm_nt
from .._numba_math import (
    _EXP32_MIN,
    _SQRT3,
    _SQRT5,
    accurate_abs_rho,
    exp32_nonpositive_inplace,
    exp_nonpositive_inplace,
)
from .base import Backend, BlockList, Candidates, QueryBatch

#: queries per thread task and candidates per GEMM: a (128 x 1024) float64 tile of G is 1 MiB;
#: float32 takes twice the queries in the same MiB, which halves how often each candidate tile
#: is packed for SGEMM per query (measured on vif 32768: 14% less select time than 128 rows)
QUERY_TILE = 128
QUERY_TILE_FLOAT32 = 256
CANDIDATE_TILE = 1024
#: a full heap's fold skips whole blocks of this many candidates that cannot enter it (_select)
FOLD_BLOCK = 32
# float32 constants of _corr32 (a float64 constant would promote its loop to float64)
_F32_ZERO = np.float32(0.0)
_F32_ONE = np.float32(1.0)
_F32_EXP_CLAMP = -_EXP32_MIN  # exp32_nonpositive_inplace clamps its argument at this, negated
_F32_MINUS_HALF = np.float32(-0.5)
_F32_FIVE_THIRDS = np.float32(5.0 / 3.0)
_SQRT3_F32 = np.float32(_SQRT3)
_SQRT5_F32 = np.float32(_SQRT5)


@dataclass(frozen=True)
class _Prepared:
    xt: np.ndarray          # (d, n) coordinates, transposed so a row loop over candidates vectorises
    v: np.ndarray           # (n, m)
    inv_sqrt_p: np.ndarray  # (n,)
    inv_scale: np.ndarray   # (d,) 1 / lengthscale
    kernel_id: int
    variance: float
    n: int


@njit(inline="always", cache=True, fastmath={"contract"})
def _abs_rho_row(kernel_id, variance, xq, inv_scale, ipq, xt, ip, c0, g, out, work):
    """out[b] = min(|variance * corr(r2(xq, x_c0+b)) - g[b]| * ipq * ip[c0+b], 1), b < out.size.

    xt and ip are the whole (contiguous) arrays, offset by c0, so loops stay unit-stride;
    work is float64 scratch of shape (3, >= out.size). The correlation is evaluated in the
    precision of the products g: float64, or float32 for the tree's float32 leaf blocks, whose
    margin covers it (precision.kernel_error); r^2 and everything after are float64.
    """
    width = out.shape[0]
    c0 = max(c0, 0)  # lets LLVM drop the negative-index wraparound, which blocks vector loads
    _corr_row(kernel_id, xq, inv_scale, xt, c0, out, work, g.itemsize == 4)
    for b in range(width):
        a = abs(variance * out[b] - g[b]) * ipq * ip[c0 + b]
        out[b] = min(1.0, a)


@njit(inline="always", cache=True, fastmath={"contract"})
def _corr_row(kernel_id, xq, inv_scale, xt, c0, out, work, single):
    """out[b] = corr(r2(xq, x_c0+b)), b < out.size, in float32 if ``single`` (as _abs_rho_row)."""
    width = out.shape[0]
    c0 = max(c0, 0)
    r2 = work[0, :width]
    for b in range(width):
        r2[b] = 0.0
    for t in range(xq.shape[0]):
        x0 = xq[t]
        s = inv_scale[t]
        for b in range(width):
            diff = (x0 - xt[t, c0 + b]) * s
            r2[b] += diff * diff
    if single:
        _corr32(kernel_id, r2, out, work)
    else:
        _corr64(kernel_id, r2, out, work)


@njit(inline="always", cache=True, fastmath={"contract"})
def _corr64(kernel_id, r2, out, work):
    """out[b] = corr(r2[b]) in float64 (one branch-free loop per family, so that each vectorises)."""
    width = r2.shape[0]
    sr = work[1, :width]
    if kernel_id == 0:
        for b in range(width):
            out[b] = -0.5 * r2[b]
        exp_nonpositive_inplace(out, work[2])
    elif kernel_id == 1:
        for b in range(width):
            out[b] = -math.sqrt(r2[b])
        exp_nonpositive_inplace(out, work[2])
    else:
        c = _SQRT3 if kernel_id == 2 else _SQRT5
        r2_coef = 0.0 if kernel_id == 2 else 5.0 / 3.0
        for b in range(width):
            sr[b] = c * math.sqrt(r2[b])
            out[b] = -sr[b]
        exp_nonpositive_inplace(out, work[2])
        for b in range(width):
            out[b] *= 1.0 + sr[b] + r2_coef * r2[b]


@njit(inline="always", cache=True, fastmath={"contract"})
def _corr32(kernel_id, r2, out, work):
    """out[b] = corr(r2[b]) evaluated in float32 (twice the SIMD lanes of _corr64), from r2
    rounded to float32; scratch in work's rows 1 and 2 viewed as float32."""
    width = r2.shape[0]
    w1 = work[1].view(np.float32)
    z = w1[:width]
    sr = w1[width:2 * width]
    tb = work[2].view(np.float32)
    if kernel_id == 0:
        for b in range(width):
            z[b] = _F32_MINUS_HALF * np.float32(r2[b])
    elif kernel_id == 1:
        for b in range(width):
            z[b] = -np.sqrt(np.float32(r2[b]))
    else:
        c = _SQRT3_F32 if kernel_id == 2 else _SQRT5_F32
        for b in range(width):
            sr[b] = c * np.sqrt(np.float32(r2[b]))
            z[b] = -sr[b]
    exp32_nonpositive_inplace(z, tb)
    # Matern: beyond the exp's clamp (s > 87) the polynomial factor would grow without bound
    # (to inf for r^2 beyond float32's range); the exact value there is below 5e-35, so 0
    if kernel_id == 2:
        for b in range(width):
            z[b] = z[b] * (_F32_ONE + sr[b]) if sr[b] <= _F32_EXP_CLAMP else _F32_ZERO
    elif kernel_id == 3:
        for b in range(width):
            z[b] = (z[b] * (_F32_ONE + sr[b] + _F32_FIVE_THIRDS * np.float32(r2[b])) if sr[b] <= _F32_EXP_CLAMP
                    else _F32_ZERO)
    for b in range(width):
        out[b] = z[b]


@njit(parallel=True, cache=True, fastmath={"contract"})
def _dense_tile(kernel_id, variance, qx, inv_scale, qip, xt, ip, g):
    out = np.empty(g.shape)
    for r in prange(g.shape[0]):
        work = np.empty((3, g.shape[1]))
        _abs_rho_row(kernel_id, variance, qx[r], inv_scale, qip[r], xt, ip, 0, g[r], out[r], work)
    return out


@njit(inline="always", cache=True)
def _sift_down(ha, hi, size):
    """Restore the min-heap (on ha) after its root was replaced; hi (the payload, moved
    along) may be None for a heap of values only."""
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and ha[child + 1] < ha[child]:
            child += 1
        if ha[child] >= ha[pos]:
            break
        ha[pos], ha[child] = ha[child], ha[pos]
        if hi is not None:
            hi[pos], hi[child] = hi[child], hi[pos]
        pos = child


@njit(inline="always", cache=True)
def heap_offer(ha, hi, size, keep, dropped, a, j):
    """Offer (a, j) to the bounded min-heap of the ``keep`` largest a (``size`` entries so far):
    pushed while there is room, else it replaces the minimum if larger; whatever leaves the heap
    or never enters raises ``dropped``. Returns (size, dropped)."""
    if size < keep:
        _heap_push(ha, hi, size, a, j)
        return size + 1, dropped
    if a > ha[0]:
        dropped = max(dropped, ha[0])
        ha[0] = a
        hi[0] = j
        _sift_down(ha, hi, size)
    elif a > dropped:
        dropped = a
    return size, dropped


@njit(inline="always", cache=True)
def _heap_push(ha, hi, size, a, j):
    """Add (a, j) to the min-heap of ``size`` entries (hi may be None, as in _sift_down)."""
    pos = size
    ha[pos] = a
    if hi is not None:
        hi[pos] = j
    while pos > 0:
        parent = (pos - 1) // 2
        if ha[parent] <= ha[pos]:
            break
        ha[pos], ha[parent] = ha[parent], ha[pos]
        if hi is not None:
            hi[pos], hi[parent] = hi[parent], hi[pos]
        pos = parent


@njit(cache=True, fastmath=False)
def _block_maxima(vals, width, out, lanes):
    """out[blk] = max(vals[blk * FOLD_BLOCK : (blk + 1) * FOLD_BLOCK]) over the first ``width``
    values; returns the number of blocks. Eight running maxima per block (lane j takes b = j mod
    8, in the caller's scratch ``lanes`` of >= 8 values, used only for whole blocks), which
    vectorise without reassociation: a maximum is exact in any order."""
    nb = (width + FOLD_BLOCK - 1) // FOLD_BLOCK
    for blk in range(nb):
        s = blk * FOLD_BLOCK
        if s + FOLD_BLOCK <= width:
            for j in range(8):
                lanes[j] = vals[s + j]
            for t in range(8, FOLD_BLOCK, 8):
                for j in range(8):
                    v = vals[s + t + j]
                    lanes[j] = max(lanes[j], v)
            top = lanes[0]
            for j in range(1, 8):
                top = max(top, lanes[j])
        else:  # the row's last, partial block
            top = vals[s]
            for b in range(s + 1, width):
                top = max(top, vals[b])
        out[blk] = top
    return nb


@njit(parallel=True, cache=True, fastmath={"contract"})
def _select(kernel_id, variance, qx, inv_scale, qip, qself, qlimit, qv, xt, v, ip, query_tile, candidate_tile,
            heap_a, heap_i, count, a_dropped, evaluations):
    """Stream every admissible candidate of every query into that query's bounded min-heap.

    One thread owns a query tile: it multiplies the tile by each candidate tile with a
    single-threaded BLAS GEMM (the tile of G stays in its cache) and folds the transformed
    row into the heaps at once. The heap keeps the ``keep`` largest fast |rho|; whatever
    leaves it or never enters raises ``a_dropped``, which certification compares against
    the k-th kept value.
    """
    q = qx.shape[0]
    keep = heap_a.shape[1]
    n_tiles = (q + query_tile - 1) // query_tile
    for t in prange(n_tiles):
        # Queries come sorted by limit, so in predecessor mode tile cost grows with its
        # position; pairing tiles from both ends (0, T-1, 1, T-2, ...) balances prange's
        # contiguous per-thread blocks.
        tile = t // 2 if t % 2 == 0 else n_tiles - 1 - t // 2
        r0 = tile * query_tile
        r1 = min(r0 + query_tile, q)
        stop = 0
        for r in range(r0, r1):
            stop = max(stop, qlimit[r])
        row = np.empty(candidate_tile)
        block_max = np.empty((candidate_tile + FOLD_BLOCK - 1) // FOLD_BLOCK)
        lanes = np.empty(8)
        work = np.empty((3, candidate_tile))
        g_full = np.empty((r1 - r0, candidate_tile), dtype=v.dtype)  # float32 V: SGEMM tiles
        for c0 in range(0, stop, candidate_tile):
            c1 = min(c0 + candidate_tile, stop)
            if c1 - c0 == candidate_tile:
                np.dot(qv[r0:r1], v[c0:c1].T, g_full)
                g = g_full
            else:
                g = np.dot(qv[r0:r1], v[c0:c1].T)
            for r in range(r0, r1):
                width = min(qlimit[r] - c0, c1 - c0)
                if width <= 0:
                    continue
                vals = row[:width]
                _abs_rho_row(kernel_id, variance, qx[r], inv_scale, qip[r], xt, ip, c0, g[r - r0], vals, work)
                ha = heap_a[r]
                hi = heap_i[r]
                size = count[r]
                dropped = a_dropped[r]
                skip = qself[r] - c0
                evaluations[r] += width - (1 if 0 <= skip < width else 0)
                if size == keep:
                    # A full heap takes a few candidates per row: fold block by block, and a
                    # block whose maximum (vectorised) does not beat the heap's minimum only
                    # raises `dropped`. The same heap and dropped maximum as the scalar fold:
                    # the minimum only grows, so nothing in such a block would have entered.
                    if 0 <= skip < width:
                        vals[skip] = -1.0  # below every a: neither enters nor raises `dropped`
                    nb = _block_maxima(vals, width, block_max, lanes)
                    for blk in range(nb):
                        if block_max[blk] <= ha[0]:
                            dropped = max(dropped, block_max[blk])
                            continue
                        for b in range(blk * FOLD_BLOCK, min(blk * FOLD_BLOCK + FOLD_BLOCK, width)):
                            size, dropped = heap_offer(ha, hi, size, keep, dropped, vals[b], c0 + b)
                    a_dropped[r] = dropped
                    continue
                for b in range(width):
                    if b != skip:
                        size, dropped = heap_offer(ha, hi, size, keep, dropped, vals[b], c0 + b)
                count[r] = size
                a_dropped[r] = dropped


@njit(parallel=True, cache=True, fastmath={"contract"})
def _select_ranges(kernel_id, variance, qx, inv_scale, qip, qself, qlimit, qv, xt, v, ip, ids, row_ptr, range_ptr,
                   starts, ends, rows_ptr, rows, candidate_tile, heap_a, heap_i, count, a_dropped, evaluations):
    """``_select`` over each tile's column ranges (BlockList) instead of every candidate: one
    thread per tile, a single-threaded GEMM per (range piece) on V's contiguous rows, for the
    range's own rows (gathered, unless nearly all of the tile's), the same transform, and
    admissibility by the columns' dataset indices ``ids``."""
    keep = heap_a.shape[1]
    m = qv.shape[1]
    for t in prange(row_ptr.size - 1):
        r0 = row_ptr[t]
        nt = row_ptr[t + 1] - r0
        if nt == 0:
            continue
        row = np.empty(candidate_tile)
        work = np.empty((3, candidate_tile))
        qbuf = np.empty((nt, m), dtype=qv.dtype)
        for s in range(range_ptr[t], range_ptr[t + 1]):
            nr = rows_ptr[s + 1] - rows_ptr[s]
            own = rows[rows_ptr[s]:rows_ptr[s + 1]]
            full = _mostly_alive(nr, nt)  # as the fused traversal: a few unused rows cost less than a gather
            if not full:
                _gather_rows(qv, 0, own, nr, qbuf)
            for c0 in range(starts[s], ends[s], candidate_tile):
                c1 = min(c0 + candidate_tile, ends[s])
                g = np.dot(qv[r0:r0 + nt], v[c0:c1].T) if full else np.dot(qbuf[:nr], v[c0:c1].T)
                for i in range(nr):
                    r = own[i]
                    vals = row[:c1 - c0]
                    _abs_rho_row(kernel_id, variance, qx[r], inv_scale, qip[r], xt, ip, c0, g[r - r0 if full else i],
                                 vals, work)
                    ha = heap_a[r]
                    hi = heap_i[r]
                    size = count[r]
                    dropped = a_dropped[r]
                    lim = qlimit[r]
                    me = qself[r]
                    done = 0
                    for b in range(c1 - c0):
                        j = ids[c0 + b]
                        if j >= lim or j == me:
                            continue
                        done += 1
                        size, dropped = heap_offer(ha, hi, size, keep, dropped, vals[b], j)
                    evaluations[r] += done
                    count[r] = size
                    a_dropped[r] = dropped


@njit(parallel=True, cache=True, fastmath=False)
def fold_block_values(vals, col_ids, qlimit, qself, heap_a, heap_i, count, a_dropped):
    """Fold a dense block of fast values (rows x columns with dataset indices col_ids) into the
    rows' bounded heaps, admissible entries only (Backend.select_blocks' host fold); returns the
    number of admissible pairs."""
    keep = heap_a.shape[1]
    done = np.zeros(vals.shape[0], dtype=np.int64)
    for r in prange(vals.shape[0]):
        size = count[r]
        dropped = a_dropped[r]
        for b in range(vals.shape[1]):
            j = col_ids[b]
            if j >= qlimit[r] or j == qself[r]:
                continue
            done[r] += 1
            size, dropped = heap_offer(heap_a[r], heap_i[r], size, keep, dropped, vals[r, b], j)
        count[r] = size
        a_dropped[r] = dropped
    return done.sum()


# --------------------------------------------------------------------------------------
# the tree's leaf blocks: (rows of a query tile) x (a prefix of a contiguous range of points)
# --------------------------------------------------------------------------------------
# The tree's traversal (residual_gpu/tree/traversal.py) calls _eval_block for the dense block
# and for each leaf it does not prune: a small product (_numba_gemm.gemm_nt, not BLAS, whose
# packing costs as much as the product at these shapes), then _fold_block folds the values into
# the rows' heaps, the residual metric's also into the k-th-value heaps (_kth_push) the
# traversal's pruning thresholds read.


@njit(inline="always", cache=True)
def _kth_push(ka, size, a):
    """Fold value a into the min-heap ka of the largest values seen (capacity ka.size)."""
    if size < ka.shape[0]:
        _heap_push(ka, None, size, a, 0)
        return size + 1
    if a <= ka[0]:
        return size
    ka[0] = a
    _sift_down(ka, None, size)
    return size


# heaps for the Euclidean metric: ties go to the smaller index
@njit(inline="always", cache=True)
def _worse(a1, j1, a2, j2):
    """(a1, j1) ranks below (a2, j2): smaller value, or equal value and larger index."""
    return a1 < a2 or (a1 == a2 and j1 > j2)


@njit(cache=True, fastmath=False)
def _eu_push(ha, hi, size, keep, a, j):
    if size < keep:
        pos = size
        ha[pos] = a
        hi[pos] = j
        while pos > 0:
            parent = (pos - 1) // 2
            if not _worse(ha[pos], hi[pos], ha[parent], hi[parent]):
                break
            ha[pos], ha[parent] = ha[parent], ha[pos]
            hi[pos], hi[parent] = hi[parent], hi[pos]
            pos = parent
        return size + 1
    if not _worse(ha[0], hi[0], a, j):
        return size
    ha[0] = a
    hi[0] = j
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and _worse(ha[child + 1], hi[child + 1], ha[child], hi[child]):
            child += 1
        if not _worse(ha[child], hi[child], ha[pos], hi[pos]):
            break
        ha[pos], ha[child] = ha[child], ha[pos]
        hi[pos], hi[child] = hi[child], hi[pos]
        pos = child
    return size


@njit(inline="always", cache=True)
def _prefix(pidx, start, end, limit):
    """Number of points of the index-sorted range [start, end) with index < limit."""
    lo = start
    hi = end
    while lo < hi:
        mid = (lo + hi) // 2
        if pidx[mid] < limit:
            lo = mid + 1
        else:
            hi = mid
    return lo - start


@njit(cache=True, fastmath=False)
def _accurate_row(kernel_id, variance, xq, vq, pq, pxt, pv, pp, scale, c0, out):
    """out[b] = the accurate (Dot2) |rho| between the query and point c0 + b: the parity
    preset's block values. A separate function without fastmath, so no FMA is contracted in."""
    for b in range(out.shape[0]):
        out[b] = accurate_abs_rho(xq, vq, pq, pxt[:, c0 + b], pv[c0 + b], pp[c0 + b], scale, kernel_id, variance)


@njit(inline="always", cache=True)
def _block_width(pidx, start, end, qlimit, r0, rows, nrows):
    """Longest admissible prefix of the index-sorted range [start, end) over rows[:nrows]."""
    width = 0
    for i in range(nrows):
        width = max(width, _prefix(pidx, start, end, qlimit[r0 + rows[i]]))
    return width


@njit(inline="always", cache=True)
def _mostly_alive(nrows, nt):
    """A leaf block multiplies all nt tile rows (no gather) when at least 7/8 of them are alive."""
    return nrows * 8 >= nt * 7


@njit(cache=True, fastmath={"contract"})
def _eval_block(metric, kernel_id, variance, rows, nrows, r0, start, end, pidx, pxt, pip, pv,
                qx, qv, inv_scale, qip, qself, qlimit, heap_a, heap_i, count, a_dropped, kth_a, kth_n, qbuf, row,
                work, sequential, qp, pp, scale):
    """Evaluate points [start, end) (index-sorted) for tile rows ``rows[:nrows]``; returns pairs.

    Each row takes the admissible prefix (index < limit) and skips itself; the block computed
    is nrows x (longest prefix), which is what the returned pair count measures. Values are
    the fast GEMM ones, or with ``sequential`` (the parity preset) the accurate ones.
    """
    width = _block_width(pidx, start, end, qlimit, r0, rows, nrows)
    if width == 0:
        return 0
    # The GEMM's rows: the tile's own (contiguous) rows when nearly all of them are alive (a few
    # unused rows cost less than gathering), else the alive rows gathered into qbuf.
    nt = qbuf.shape[0]
    full = _mostly_alive(nrows, nt)
    if metric == 0 and not sequential:
        if full:
            g = gemm_nt(qv[r0:r0 + nt], pv[start:start + width], np.empty((nt, width), dtype=qbuf.dtype))
        else:
            _gather_rows(qv, r0, rows, nrows, qbuf)
            g = gemm_nt(qbuf[:nrows], pv[start:start + width], np.empty((nrows, width), dtype=qbuf.dtype))
    else:
        g = np.empty((1, 1), dtype=qbuf.dtype)
    _fold_block(metric, kernel_id, variance, rows, nrows, r0, start, end, pidx, pxt, pip, pv, qx, qv, inv_scale,
                qip, qself, qlimit, heap_a, heap_i, count, a_dropped, kth_a, kth_n, row, work, sequential, qp, pp,
                scale, g, full)
    return nrows * width


@njit(inline="always", cache=True)
def _fold_value(ha, hi, size, keep, ka, kn, dropped, a, j):
    """Fold value a of point j into a row's keep-heap (ha, hi; size entries) and k-th-value heap
    (ka; kn entries); returns the new (size, kn, dropped)."""
    if size == keep and a <= ha[0]:
        # the common case: below the keep-th (so below the k-th) kept value
        return size, kn, max(dropped, a)
    kn = _kth_push(ka, kn, a)
    if size < keep:
        _heap_push(ha, hi, size, a, j)
        return size + 1, kn, dropped
    dropped = max(dropped, ha[0])
    ha[0] = a
    hi[0] = j
    _sift_down(ha, hi, size)
    return size, kn, dropped


@njit(inline="always", cache=True)
def _self_position(pidx, start, w, me, limit):
    """Position of the query itself (dataset index me) in the index-sorted range [start, start + w), or -1."""
    if 0 <= me < limit:
        pos = start + _prefix(pidx, start, start + w, me)
        if pos < start + w and pidx[pos] == me:
            return pos - start
    return -1


@njit(inline="always", cache=True)
def _gather_rows(qv, r0, rows, nrows, qbuf):
    """qbuf[i] = qv[r0 + rows[i]] for i < nrows."""
    m = qv.shape[1]
    for i in range(nrows):
        r = r0 + rows[i]
        for t in range(m):
            qbuf[i, t] = qv[r, t]


@njit(cache=True, fastmath={"contract"})
def _fold_block(metric, kernel_id, variance, rows, nrows, r0, start, end, pidx, pxt, pip, pv, qx, qv, inv_scale,
                qip, qself, qlimit, heap_a, heap_i, count, a_dropped, kth_a, kth_n, row, work, sequential, qp, pp,
                scale, g, full):
    """Fold the values of points [start, end) into the heaps of rows ``rows[:nrows]``.

    The fast values' V products are g[rows[i] if full else i, b] for point start + b.
    """
    keep = heap_a.shape[1]
    for i in range(nrows):
        r = r0 + rows[i]
        w = _prefix(pidx, start, end, qlimit[r])
        if w == 0:
            continue
        vals = row[:w]
        ha = heap_a[r]
        hi = heap_i[r]
        size = count[r]
        me = qself[r]
        if metric == 0:
            if sequential:
                _accurate_row(kernel_id, variance, qx[r], qv[r], qp[r], pxt, pv, pp, scale, start, vals)
            else:
                _abs_rho_row(kernel_id, variance, qx[r], inv_scale, qip[r], pxt, pip, start, g[rows[i] if full else i], vals, work)
            dropped = a_dropped[r]
            ka = kth_a[r]
            kn = kth_n[r]
            skip = _self_position(pidx, start, w, me, qlimit[r])
            for b in range(w):
                if b == skip:
                    continue
                size, kn, dropped = _fold_value(ha, hi, size, keep, ka, kn, dropped, vals[b], pidx[start + b])
            a_dropped[r] = dropped
            kth_n[r] = kn
        else:
            d = qx.shape[1]
            for b in range(w):
                j = pidx[start + b]
                if j == me:
                    continue
                s = 0.0
                for t in range(d):
                    diff = (qx[r, t] - pxt[t, start + b]) * inv_scale[t]
                    s += diff * diff
                size = _eu_push(ha, hi, size, keep, -s, j)
        count[r] = size


@njit(cache=True, fastmath={"contract"})
def _filter_leaf(kernel_id, variance, rows, nrows, r0, start, end, slot, pidx, pxt, pip, pv, qx, qv, inv_scale, qip,
                 qself, qlimit, heap_a, heap_i, count, a_dropped, kth_a, kth_n, qbuf, row, work, ranks, basis, coef,
                 tail, under, tail_median, qw, rowth, stats):
    """The low-rank leaf filter (tree/leaf_filter.py) on the rows of ``rows[:nrows]`` it can help.

    A row is filtered when w_q e_j is below its pruning threshold ``rowth`` for the leaf's median
    e_j (else few of its points could be dropped): per point, F = min(1, |kval - fl(P . c_j)| ip_q ip_j) + w_q e_j;
    F below the threshold drops the point with F, otherwise its m-length product gives the fast
    value, folded as in _fold_block. The rows left unfiltered are compacted into rows[:n] and n is
    returned, for _eval_block. ``stats`` += (screened pairs, dropped pairs, evaluated pairs,
    m-length-equivalent products of the filter).
    """
    rank = ranks[slot]
    m = qv.shape[1]
    width = _block_width(pidx, start, end, qlimit, r0, rows, nrows)
    if width < 2 * rank:  # the projection would cost about what it saves
        return nrows
    tail_mid = tail_median[slot]
    nf = 0
    nleft = 0
    frows = np.empty(nrows, dtype=np.int64)
    for i in range(nrows):
        r = r0 + rows[i]
        if qw[r] * tail_mid < rowth[rows[i]]:
            frows[nf] = rows[i]
            nf += 1
        else:
            rows[nleft] = rows[i]
            nleft += 1
    if nf == 0:
        return nleft
    _gather_rows(qv, r0, frows, nf, qbuf)
    proj = gemm_nt(qbuf[:nf], basis[slot, :rank], np.empty((nf, rank), dtype=qbuf.dtype))
    approx = gemm_nt(proj, coef[start:start + width, :rank], np.empty((nf, width), dtype=qbuf.dtype))
    stats[3] += nf * rank + (nf * width * rank) // max(m, 1)
    keep = heap_a.shape[1]
    single = qbuf.itemsize == 4
    surv = np.empty(width, dtype=np.int64)
    for i in range(nf):
        r = r0 + frows[i]
        w = _prefix(pidx, start, end, qlimit[r])
        if w == 0:
            continue
        corr = row[:w]
        _corr_row(kernel_id, qx[r], inv_scale, pxt, start, corr, work, single)
        ipq = qip[r]
        wq = qw[r]
        fval = work[0, :w]  # r^2 is spent
        for b in range(w):
            fval[b] = (min(1.0, abs(variance * corr[b] - approx[i, b]) * ipq * pip[start + b]) + wq * tail[start + b]
                       + ipq * under[start + b])
        skip = _self_position(pidx, start, w, qself[r], qlimit[r])
        th = rowth[frows[i]]
        dropped = a_dropped[r]
        ns = 0
        for b in range(w):
            if b == skip:
                continue
            if fval[b] < th:
                dropped = max(dropped, fval[b])
            else:
                surv[ns] = b
                ns += 1
        screened = w - (1 if skip >= 0 else 0)
        stats[0] += screened
        stats[1] += screened - ns
        stats[2] += ns
        g = work[1, :ns]
        gather_dots(qbuf[i], pv, start, surv, ns, g)
        ha = heap_a[r]
        hi = heap_i[r]
        size = count[r]
        ka = kth_a[r]
        kn = kth_n[r]
        for s in range(ns):
            b = surv[s]
            a = min(1.0, abs(variance * corr[b] - g[s]) * ipq * pip[start + b])
            size, kn, dropped = _fold_value(ha, hi, size, keep, ka, kn, dropped, a, pidx[start + b])
        count[r] = size
        a_dropped[r] = dropped
        kth_n[r] = kn
    return nleft


def select_state(q: int, keep: int):
    """Empty per-query select state: heaps (values -1, indices -1), their sizes, the dropped
    maxima (-1: none dropped) and the evaluation counts."""
    return (np.full((q, keep), -1.0), np.full((q, keep), -1, dtype=np.int64), np.zeros(q, dtype=np.int64),
            np.full(q, -1.0), np.zeros(q, dtype=np.int64))


class CpuBackend(Backend):
    """Numba + BLAS on the host; always available."""

    name = "cpu"

    @classmethod
    def availability(cls):
        return True, "numba and numpy's BLAS"

    def prepare(self, problem):
        return _Prepared(
            xt=np.ascontiguousarray(problem.coords.T),
            v=problem.v,
            inv_sqrt_p=1.0 / np.sqrt(problem.p),
            inv_scale=1.0 / problem.lengthscales,
            kernel_id=problem.kernel.kernel_id,
            variance=problem.kernel.variance,
            n=problem.n,
        )

    def abs_rho_tile(self, prepared, batch: QueryBatch, cols: np.ndarray) -> np.ndarray:
        cols = np.asarray(cols, dtype=np.int64)
        g = batch.v @ prepared.v[cols].T
        return _dense_tile(prepared.kernel_id, prepared.variance, batch.coords, prepared.inv_scale,
                           1.0 / np.sqrt(batch.p), np.ascontiguousarray(prepared.xt[:, cols]),
                           prepared.inv_sqrt_p[cols], g)

    def select_candidates(self, prepared, batch: QueryBatch, keep: int) -> Candidates:
        heap_a, heap_i, count, a_dropped, evaluations = select_state(batch.size, keep)
        # Parallelism is across query tiles, each with a single-threaded GEMM: BLAS threads
        # and Numba threads would otherwise take turns (and spin against each other).
        with single_blas_thread():
            _select(prepared.kernel_id, prepared.variance, batch.coords, prepared.inv_scale,
                    1.0 / np.sqrt(batch.p), batch.self_index, batch.limit, batch.v, prepared.xt, prepared.v,
                    prepared.inv_sqrt_p, QUERY_TILE if prepared.v.dtype == np.float64 else QUERY_TILE_FLOAT32,
                    CANDIDATE_TILE, heap_a, heap_i, count, a_dropped,
                    evaluations)
        return Candidates(index=heap_i, abs_rho=heap_a, a_dropped=a_dropped, evaluations=int(evaluations.sum()))

    def select_blocks(self, prepared, batch: QueryBatch, keep: int, blocks: BlockList) -> Candidates:
        heap_a, heap_i, count, a_dropped, evaluations = select_state(batch.size, keep)
        rows_ptr, rows = blocks.row_lists()
        with single_blas_thread():
            _select_ranges(prepared.kernel_id, prepared.variance, batch.coords, prepared.inv_scale,
                           1.0 / np.sqrt(batch.p), batch.self_index, batch.limit,
                           np.ascontiguousarray(batch.v, dtype=prepared.v.dtype), prepared.xt, prepared.v,
                           prepared.inv_sqrt_p, blocks.ids, blocks.row_ptr, blocks.range_ptr, blocks.starts,
                           blocks.ends, rows_ptr, rows, CANDIDATE_TILE, heap_a, heap_i, count, a_dropped, evaluations)
        return Candidates(index=heap_i, abs_rho=heap_a, a_dropped=a_dropped, evaluations=int(evaluations.sum()))
