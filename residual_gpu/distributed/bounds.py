"""A proven upper bound on |rho| between a query and every point of a shard, and the pruning rule.

The shard is covered by *cut nodes*, each with the tree's node summary (docs/tree.md section 1,
"Node summaries"): the leaves of a coarse residual tree over the shard (``build_tree`` with
about ``leaves`` leaves) for its ordinary points, and one singleton node per *dense* point (tiny
p, the inducing points and their neighbours), whose 1/sqrt(p) would make any shared node's
bound vacuous. For a query q and a node N the tree's bound U_qN = ``tree.bounds.residual_bound``
(docs/tree.md section 2, derivation and rounding terms there) holds for every j in N; so

    U_qs = max over the cut nodes N of s with an admissible point (smallest index < limit_q) of U_qN

bounds the real-number |rho_qj| of every admissible point of the shard. Pruning (docs/distributed.md,
"Pruning shards") compares it with the query's k-th distance from its home shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .._numba_math import row_norms
from ..precision import accurate_rho_error, gamma, kernel_error
from ..problem import ProblemView
from ..tree import build_tree, query_factors, residual_bound, transform_of

_U = 2.0**-53
#: absolute slack on |rho| in the pruning rule (module ``prunable``): far above the few u of
#: rounding in 1 - d_k^2 and in the final sqrt, far below any |rho| gap that matters
PRUNE_SLACK = 1e-12


@dataclass(frozen=True)
class ShardSummary:
    """Cut nodes of one shard: boxes (c, d), summaries (c, m) and scalars (c,) as in SearchTree,
    ``first`` the smallest global index below each node; the shard-wide ``w_max`` = max ||V_j||
    and ``p_min`` = min p_j (for the accurate-value error), and the problem's constants."""

    lo: np.ndarray
    hi: np.ndarray
    mid: np.ndarray
    rad: np.ndarray
    ymin: np.ndarray
    ymax: np.ndarray
    zeta: np.ndarray
    zabs: np.ndarray
    first: np.ndarray
    w_max: float
    p_min: float
    transform: np.ndarray
    inv_scale: np.ndarray
    kernel_id: int
    variance: float

    @property
    def nodes(self) -> int:
        return self.first.size


def summarize(problem, rows: np.ndarray, leaves: int = 32) -> ShardSummary:
    """The cut nodes of a shard's problem (its points, in ascending global indices ``rows``)."""
    n = problem.n
    coarse = build_tree(problem, leaf_size=max(1, -(-n // leaves)), progress=False)
    parts = [(coarse, rows)]
    if coarse.dense.size:
        # one singleton leaf per dense point: a tree over them alone, none of them dense there
        view = ProblemView(problem, coarse.dense)
        parts.append((build_tree(view, leaf_size=1, dense_ratio=0.0, progress=False), rows[coarse.dense]))
    cut = {name: [] for name in ("lo", "hi", "mid", "rad", "ymin", "ymax", "zeta", "zabs", "first")}
    for tree, global_rows in parts:
        leaf = tree.node_left < 0
        for name in ("lo", "hi", "mid", "rad", "ymin", "ymax", "zeta", "zabs"):
            cut[name].append(getattr(tree, "node_" + name)[leaf])
        cut["first"].append(global_rows[tree.node_min[leaf]])
    arrays = {name: np.ascontiguousarray(np.concatenate(parts_)) for name, parts_ in cut.items()}
    return ShardSummary(**arrays, w_max=float(problem.v_norms.max()), p_min=float(problem.p.min()),
                        transform=transform_of(problem), inv_scale=1.0 / problem.lengthscales,
                        kernel_id=problem.kernel.kernel_id, variance=float(problem.kernel.variance))


@njit(parallel=True, cache=True, fastmath=False)
def _max_bounds(kernel_id, variance, kerr, eps_d, gam, tnorm, lo, hi, ymin, ymax, zeta, zabs, first, s0, sr,
                qx, inv_scale, qip, qrn, qna, qlimit, out):
    for i in prange(qx.shape[0]):
        best = -1.0
        for nd in range(first.size):
            if first[nd] >= qlimit[i]:
                continue
            u = residual_bound(kernel_id, variance, kerr, eps_d, gam, gam, tnorm, qx[i], inv_scale, qip[i], qrn[i],
                               qna[i], lo[nd], hi[nd], ymin[nd], ymax[nd], zeta[nd], zabs[nd], s0[i, nd], sr[i, nd])
            best = max(best, u)
        out[i] = best


def shard_bounds(summary: ShardSummary, qx: np.ndarray, qv: np.ndarray, qp: np.ndarray,
                 qlimit: np.ndarray) -> np.ndarray:
    """U_qs (q,): an upper bound on the real-number |rho| between each query (coordinates,
    V rows, p) and every point of the shard with global index < qlimit; -1 where none is."""
    m = qv.shape[1]
    d = qx.shape[1]
    t = summary.transform
    tnorm = float(row_norms(t.reshape(1, -1))[0]) * (1.0 + (m + 2) * _U) if t.size else math.sqrt(m)
    gam = 2.0 * gamma(m + 4)
    a, rn, na = query_factors(t, np.ascontiguousarray(qv), gam, tnorm)
    s0 = np.ascontiguousarray(a @ summary.mid.T)
    sr = np.ascontiguousarray(np.abs(a) @ summary.rad.T)
    out = np.empty(qx.shape[0])
    _max_bounds(summary.kernel_id, summary.variance, kernel_error(d) * summary.variance, 4.0 * (d + 8) * _U, gam,
                tnorm, summary.lo, summary.hi, summary.ymin, summary.ymax, summary.zeta, summary.zabs, summary.first,
                s0, sr, np.ascontiguousarray(qx), summary.inv_scale, 1.0 / np.sqrt(qp), rn, na,
                np.ascontiguousarray(qlimit, dtype=np.int64), out)
    return out


def prunable(bound: np.ndarray, summary: ShardSummary, qv_norms: np.ndarray, qp: np.ndarray,
             kth_distance: np.ndarray) -> np.ndarray:
    """True where no point of the shard can enter the query's top k, given the accurate k-th
    distance d_k of its home shard (inf when the home shard has fewer than k): every point j of
    the shard has accurate |rho| at most U_qs + E_qj (precision.accurate_rho_error, taken at the
    shard's largest ||V_j|| and smallest p_j), and U_qs + E + PRUNE_SLACK < 1 - d_k^2 makes its
    accurate distance sqrt(1 - |rho|) strictly larger than d_k, so it neither beats nor ties the
    k home neighbours (docs/distributed.md, "Pruning shards")."""
    m = summary.mid.shape[1]
    d = summary.lo.shape[1]
    e = accurate_rho_error(qv_norms, np.array([summary.w_max]), qp, np.array([summary.p_min]), m, d,
                           summary.variance)[:, 0]
    with np.errstate(invalid="ignore"):
        threshold = 1.0 - kth_distance * kth_distance  # -inf where d_k = inf: nothing is pruned
    return bound + e + PRUNE_SLACK < threshold
