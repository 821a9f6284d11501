"""The host search tree: a forest of kd-trees over the coordinates with residual node summaries.

Layout (docs/tree.md has the full description, precise enough to re-implement):

- Points whose residual variance is tiny (p_j < dense_ratio * median p: the inducing points
  and their immediate neighbours) are kept out of the tree, in ``dense`` (sorted dataset
  indices); every query evaluates them directly.
- The other points are split by dataset index into blocks [0, s0), [s0, 2 s0), [2 s0, 4 s0),
  ... (s0 = max(ceil(n / 16), 32 * leaf_size)); each block is one kd-tree, so a predecessor
  query i searches the blocks below i fully and only its own block partially.
- A kd-tree node covers a contiguous range ``[start, end)`` of ``perm`` (tree position ->
  dataset index). An internal node splits its range at ``count // 2`` after ordering it by
  (x_t, index) on the dimension t of largest lengthscale-scaled extent; a leaf holds at most
  ``leaf_size`` points, ordered by dataset index (so the admissible points of a predecessor
  query form a prefix). Nodes are numbered in preorder, block after block.
- Every node stores its coordinate box [lo, hi] (raw coordinates), the smallest dataset
  index below it, and (residual metric) a summary of its rows in the inducing basis:
  z_j = (T V_j) / sqrt(p_j) with T = chol(K_UU + jitter) (so T V_j = k(U, x_j)), stored as
  the per-coordinate interval centre ``mid`` and radius ``rad`` (m each), the range
  [ymin, ymax] of 1/sqrt(p_j), zeta = max_j ||V_j|| / sqrt(p_j) and ||max(|lo|, |hi|)||.

The summaries are computed by bounds.py (``_summaries``, called from ``build_tree``); the bound
they give is derived in docs/tree.md section 2 and implemented in ``bounds.residual_bound``.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import dataclass, field, fields

import numpy as np
from numba import njit
from tqdm.auto import tqdm

from ..errors import IndexFormatError, InvalidArgumentError
from .bounds import _summaries

#: version of the saved tree arrays; bump on any layout change
TREE_FORMAT_VERSION = 1
METRICS = {"residual": 0, "euclidean": 1}
#: points with p_j < DENSE_RATIO * median(p) are evaluated densely instead of living in the tree
DENSE_RATIO = 1.0 / 64.0
DEFAULT_LEAF_SIZE = 64


def block_bounds(n: int, leaf_size: int, first_block_divisor: int = 16) -> np.ndarray:
    """Dataset-index boundaries of the blocks: 0, s0, 2 s0, 4 s0, ..., n, with
    s0 = max(ceil(n / first_block_divisor), 32 * leaf_size)."""
    s0 = max(-(-n // first_block_divisor), 32 * leaf_size)
    out = [0]
    b = s0
    while b < n:
        out.append(b)
        b *= 2
    out.append(n)
    return np.asarray(out, dtype=np.int64)


@njit(cache=True, fastmath=False)
def _build_kd(idx, x, inv_scale, leaf_size, first_id, start0,
              node_start, node_end, node_left, node_right, node_lo, node_hi, node_min, perm):
    """kd-tree over the dataset indices ``idx`` (ascending), preorder ids from ``first_id``.

    Writes the tree's point order into perm[start0 : start0 + idx.size]; returns the next
    free node id.
    """
    d = x.shape[1]
    cap = 64
    st_lo = np.empty(cap, dtype=np.int64)
    st_hi = np.empty(cap, dtype=np.int64)
    st_parent = np.empty(cap, dtype=np.int64)
    st_side = np.empty(cap, dtype=np.int64)
    work = idx.copy()
    sp = 0
    st_lo[0] = 0
    st_hi[0] = idx.size
    st_parent[0] = -1
    st_side[0] = 0
    sp = 1
    nid = first_id
    while sp > 0:
        sp -= 1
        a = st_lo[sp]
        b = st_hi[sp]
        parent = st_parent[sp]
        side = st_side[sp]
        me = nid
        nid += 1
        if parent >= 0:
            if side == 0:
                node_left[parent] = me
            else:
                node_right[parent] = me
        seg = np.sort(work[a:b])  # by dataset index
        node_start[me] = start0 + a
        node_end[me] = start0 + b
        node_min[me] = seg[0]
        best_t = 0
        best_w = -1.0
        for t in range(d):
            lo = x[seg[0], t]
            hi = lo
            for c in range(seg.size):
                v = x[seg[c], t]
                lo = min(lo, v)
                hi = max(hi, v)
            node_lo[me, t] = lo
            node_hi[me, t] = hi
            w = (hi - lo) * inv_scale[t]
            if w > best_w:
                best_w = w
                best_t = t
        node_left[me] = -1
        node_right[me] = -1
        if b - a <= leaf_size:
            for c in range(seg.size):
                work[a + c] = seg[c]
            continue
        keys = np.empty(seg.size)
        for c in range(seg.size):
            keys[c] = x[seg[c], best_t]
        order = np.argsort(keys, kind="mergesort")  # stable: equal coordinates keep index order
        for c in range(seg.size):
            work[a + c] = seg[order[c]]
        half = (b - a) // 2
        if sp + 2 > cap:
            cap *= 2
            st_lo = np.concatenate((st_lo, np.empty(cap - st_lo.size, dtype=np.int64)))
            st_hi = np.concatenate((st_hi, np.empty(cap - st_hi.size, dtype=np.int64)))
            st_parent = np.concatenate((st_parent, np.empty(cap - st_parent.size, dtype=np.int64)))
            st_side = np.concatenate((st_side, np.empty(cap - st_side.size, dtype=np.int64)))
        # right first, so that the left child is popped next and gets id me + 1 (preorder)
        st_lo[sp] = a + half
        st_hi[sp] = b
        st_parent[sp] = me
        st_side[sp] = 1
        sp += 1
        st_lo[sp] = a
        st_hi[sp] = a + half
        st_parent[sp] = me
        st_side[sp] = 0
        sp += 1
    for c in range(idx.size):
        perm[start0 + c] = work[c]
    return nid


_INT_ARRAYS = frozenset(("perm", "node_start", "node_end", "node_left", "node_right", "node_min", "roots", "root_lo",
                         "dense"))


@dataclass
class SearchTree:
    """Flat arrays of the forest (see the module docstring); ``n`` is the dataset size."""

    metric: str
    n: int
    leaf_size: int
    dense_ratio: float
    dense_cut: float
    perm: np.ndarray
    node_start: np.ndarray
    node_end: np.ndarray
    node_left: np.ndarray
    node_right: np.ndarray
    node_lo: np.ndarray
    node_hi: np.ndarray
    node_min: np.ndarray
    roots: np.ndarray
    root_lo: np.ndarray
    dense: np.ndarray
    transform: np.ndarray          # (m, m) lower triangular T, or (0, 0) for the identity
    node_mid: np.ndarray           # (nodes, m); (nodes, 0) for the euclidean metric
    node_rad: np.ndarray
    node_ymin: np.ndarray
    node_ymax: np.ndarray
    node_zeta: np.ndarray
    node_zabs: np.ndarray
    build_seconds: dict = field(default_factory=dict)

    @property
    def nodes(self) -> int:
        return self.node_start.size

    @property
    def leaves(self) -> int:
        return int(np.count_nonzero(self.node_left < 0))

    # -- persistence -----------------------------------------------------------------
    _SCALARS = ("metric", "n", "leaf_size", "dense_ratio", "dense_cut")

    def to_arrays(self, prefix: str = "tree_") -> dict:
        out = {}
        for f in fields(self):
            if f.name == "build_seconds":
                continue
            val = getattr(self, f.name)
            out[prefix + f.name] = np.asarray(val)
        out[prefix + "format_version"] = np.asarray(TREE_FORMAT_VERSION)
        return out

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "tree_", n: int | None = None, d: int | None = None,
                    m: int | None = None) -> SearchTree:
        try:
            version = int(arrays[prefix + "format_version"])
            if version != TREE_FORMAT_VERSION:
                raise IndexFormatError(f"saved tree has format version {version}, this build reads {TREE_FORMAT_VERSION}")
            kw = {}
            for f in fields(cls):
                if f.name == "build_seconds":
                    continue
                a = np.asarray(arrays[prefix + f.name])
                if f.name == "metric":
                    kw[f.name] = str(a)
                elif f.name in ("n", "leaf_size"):
                    kw[f.name] = int(a)
                elif f.name in ("dense_ratio", "dense_cut"):
                    kw[f.name] = float(a)
                else:
                    kw[f.name] = np.ascontiguousarray(a)
        except IndexFormatError:
            raise
        except (KeyError, ValueError, TypeError) as exc:
            raise IndexFormatError(f"saved tree is incomplete or malformed: {exc}") from exc
        tree = cls(**kw)
        tree.validate(n=n, d=d, m=m)
        return tree

    def validate(self, n: int | None = None, d: int | None = None, m: int | None = None) -> None:
        """Structural checks; raises IndexFormatError on any inconsistency."""
        def bad(msg):
            raise IndexFormatError(f"saved tree is inconsistent: {msg}")

        if self.metric not in METRICS:
            bad(f"unknown metric {self.metric!r}")
        for f in fields(self):
            a = getattr(self, f.name)
            if not isinstance(a, np.ndarray):
                continue
            want = np.int64 if f.name in _INT_ARRAYS else np.float64
            if a.dtype != want:
                bad(f"{f.name} has dtype {a.dtype}, expected {np.dtype(want)}")
        if n is not None and self.n != n:
            bad(f"tree is over n={self.n} points, the problem has n={n}")
        nn = self.node_start.size
        for name in ("node_end", "node_left", "node_right", "node_min"):
            if getattr(self, name).shape != (nn,):
                bad(f"{name} has shape {getattr(self, name).shape}, expected ({nn},)")
        dd = self.node_lo.shape[1] if self.node_lo.ndim == 2 else -1
        if self.node_lo.shape != (nn, dd) or self.node_hi.shape != (nn, dd) or (d is not None and dd != d):
            bad("node boxes have the wrong shape")
        if self.node_mid.ndim != 2 or self.node_mid.shape[0] != nn or self.node_rad.shape != self.node_mid.shape:
            bad("node summaries have the wrong shape")
        if m is not None and self.metric == "residual" and self.node_mid.shape[1] != m:
            bad(f"node summaries have {self.node_mid.shape[1]} columns, the problem has m={m}")
        for name in ("node_ymin", "node_ymax", "node_zeta", "node_zabs"):
            want = (nn,) if self.metric == "residual" else (0,)
            if getattr(self, name).shape != want:
                bad(f"{name} has shape {getattr(self, name).shape}, expected {want}")
        npts = self.perm.size
        if self.perm.size + self.dense.size != self.n:
            bad("perm and dense do not partition the points")
        seen = np.zeros(self.n, dtype=np.int64)
        if np.any(self.perm < 0) or np.any(self.perm >= self.n) or np.any(self.dense < 0) or np.any(self.dense >= self.n):
            bad("point index out of range")
        np.add.at(seen, self.perm, 1)
        np.add.at(seen, self.dense, 1)
        if np.any(seen != 1):
            bad("perm and dense do not partition the points")
        if nn and (np.any(self.node_start < 0) or np.any(self.node_end > npts) or np.any(self.node_end <= self.node_start)):
            bad("node ranges out of bounds")
        inner = self.node_left >= 0
        if np.any(self.node_left[inner] >= nn) or np.any(self.node_right[inner] >= nn) or np.any(self.node_right[inner] < 0):
            bad("child ids out of range")
        if np.any(self.node_left[inner] <= np.flatnonzero(inner)) or np.any(self.node_right[inner] <= np.flatnonzero(inner)):
            bad("children must follow their parent (preorder)")
        if self.roots.shape != self.root_lo.shape or np.any(self.roots < 0) or np.any(self.roots >= max(nn, 1)):
            bad("roots out of range")
        if self.transform.ndim != 2 or self.transform.shape[0] != self.transform.shape[1]:
            bad("transform must be square")


def build_forest(coords: np.ndarray, inv_scale: np.ndarray, tree_points: np.ndarray, bounds: np.ndarray,
                 leaf_size: int):
    """kd-trees over ``tree_points`` (ascending dataset indices), one per index block."""
    npts = tree_points.size
    cap = max(1, 4 * (npts // max(leaf_size // 2, 1) + bounds.size))
    d = coords.shape[1]
    node_start = np.empty(cap, dtype=np.int64)
    node_end = np.empty(cap, dtype=np.int64)
    node_left = np.empty(cap, dtype=np.int64)
    node_right = np.empty(cap, dtype=np.int64)
    node_lo = np.empty((cap, d))
    node_hi = np.empty((cap, d))
    node_min = np.empty(cap, dtype=np.int64)
    perm = np.empty(npts, dtype=np.int64)
    roots = []
    root_lo = []
    nid = 0
    pos = 0
    for lo, hi in itertools.pairwise(bounds):
        a, b = np.searchsorted(tree_points, [lo, hi])
        if b <= a:
            continue
        roots.append(nid)
        root_lo.append(int(tree_points[a]))
        nid = _build_kd(np.ascontiguousarray(tree_points[a:b]), coords, inv_scale, leaf_size, nid, pos,
                        node_start, node_end, node_left, node_right, node_lo, node_hi, node_min, perm)
        pos += b - a
    return {"perm": perm, "node_start": node_start[:nid].copy(), "node_end": node_end[:nid].copy(),
            "node_left": node_left[:nid].copy(), "node_right": node_right[:nid].copy(),
            "node_lo": node_lo[:nid].copy(), "node_hi": node_hi[:nid].copy(), "node_min": node_min[:nid].copy(),
            "roots": np.asarray(roots, dtype=np.int64), "root_lo": np.asarray(root_lo, dtype=np.int64)}


def transform_of(problem) -> np.ndarray:
    """T with T V_j = k(U, x_j): the Cholesky factor of K_UU + jitter, or (0, 0) (identity)."""
    chol = problem.chol
    if chol is None:
        return np.zeros((0, 0))
    return np.ascontiguousarray(chol)


#: the forest's layout: what build_forest returns, which depends on the coordinates, the points
#: kept out of the kd-trees (the dense set), the leaf size and the lengthscales' split choices
LAYOUT_FIELDS = ("perm", "node_start", "node_end", "node_left", "node_right", "node_lo", "node_hi", "node_min",
                 "roots", "root_lo")


def build_tree(problem, leaf_size: int = DEFAULT_LEAF_SIZE, dense_ratio: float = DENSE_RATIO,
               progress: bool | None = None, sequential: bool = False, layout: SearchTree | None = None) -> SearchTree:
    """The residual-metric forest of a ResidualProblem (see the module docstring).

    sequential: compute the summaries with fixed-order loops instead of BLAS (the parity
    preset: the Rust oracle then builds the same arrays bit for bit; slower).
    layout: a tree over the same coordinates (another kernel's) whose kd split is reused when
    its dense set and leaf size are this tree's: node boxes are raw coordinates, so any split is
    a valid one and only the summaries depend on the kernel; the answers stay exact either way,
    and a fresh split may differ only where the lengthscales change the widest scaled axis.
    """
    leaf_size = int(leaf_size)
    if leaf_size < 1:
        raise InvalidArgumentError(f"leaf_size must be >= 1, got leaf_size={leaf_size!r}")
    t0 = time.perf_counter()
    p = problem.p
    n = problem.n
    dense_cut = float(np.median(p)) * float(dense_ratio)
    is_dense = p < dense_cut
    tree_points = np.flatnonzero(~is_dense).astype(np.int64)
    dense = np.flatnonzero(is_dense).astype(np.int64)
    inv_scale = 1.0 / problem.lengthscales
    disable = True if progress is False else (None if progress is None else False)
    with tqdm(total=tree_points.size * 2, unit="pt", desc="residual tree build", disable=disable, delay=1.0,
              leave=False) as bar:
        if (layout is not None and layout.n == n and layout.leaf_size == leaf_size
                and np.array_equal(layout.dense, dense)):
            arrays = {name: getattr(layout, name) for name in LAYOUT_FIELDS}
        else:
            arrays = build_forest(problem.coords, inv_scale, tree_points, block_bounds(n, leaf_size), leaf_size)
        bar.update(tree_points.size)
        t1 = time.perf_counter()
        transform = transform_of(problem)
        tree = SearchTree(metric="residual", n=n, leaf_size=leaf_size, dense_ratio=float(dense_ratio),
                          dense_cut=dense_cut, dense=dense, transform=transform,
                          node_mid=np.zeros((0, 0)), node_rad=np.zeros((0, 0)), node_ymin=np.zeros(0),
                          node_ymax=np.zeros(0), node_zeta=np.zeros(0), node_zabs=np.zeros(0), **arrays)
        _summaries(tree, problem.v, p, problem.v_norms, transform, bar, sequential)
    tree.build_seconds = {"tree_split": t1 - t0, "tree_summaries": time.perf_counter() - t1}
    return tree


def build_euclidean_tree(coords: np.ndarray, leaf_size: int = 32) -> SearchTree:
    """A single kd-tree over all points, no summaries: for plain Euclidean kNN."""
    x = np.ascontiguousarray(coords, dtype=np.float64)
    n, d = x.shape
    pts = np.arange(n, dtype=np.int64)
    arrays = build_forest(x, np.ones(d), pts, np.array([0, n], dtype=np.int64), int(leaf_size))
    z = np.zeros((arrays["node_start"].size, 0))
    e = np.zeros(0)
    return SearchTree(metric="euclidean", n=n, leaf_size=int(leaf_size), dense_ratio=0.0, dense_cut=0.0,
                      dense=np.zeros(0, dtype=np.int64), transform=np.zeros((0, 0)), node_mid=z, node_rad=z.copy(),
                      node_ymin=e, node_ymax=e, node_zeta=e, node_zabs=e, **arrays)


def euclidean_knn(coords, k: int, queries=None, query_coords=None, leaf_size: int = 32,
                  tile_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Plain Euclidean kNN on the coordinates with the same tree and traversal code.

    queries: dataset indices (default every point; a point is not its own neighbour) or
    query_coords: new locations. Returns (indices, distances) ascending, ties to the smaller index.
    """
    from .searcher import euclidean_search

    x = np.ascontiguousarray(np.asarray(coords, dtype=np.float64))
    if x.ndim == 1:
        x = x[:, None]
    tree = build_euclidean_tree(x, leaf_size)
    return euclidean_search(tree, x, int(k), queries=queries, query_coords=query_coords, tile_size=tile_size)


def arrays_digest(arrays: dict) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the arrays (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()

