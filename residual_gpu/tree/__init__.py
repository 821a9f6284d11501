"""The search tree of ``method="tree"``: exact kNN that evaluates only part of the candidates.

docs/tree.md describes it in full (precise enough to re-implement). Read the modules in this order:

- ``layout.py``: what the tree is and how it is built. The dense set, the forest of kd-trees over
  index blocks (``block_bounds``, ``build_forest``), the flat ``SearchTree`` arrays and their
  persistence (``to_arrays``/``from_arrays``/``validate``, ``TREE_FORMAT_VERSION``,
  ``arrays_digest``), ``build_tree`` (residual metric), ``build_euclidean_tree`` and
  ``euclidean_knn`` (plain Euclidean kNN on the same code). docs/tree.md sections 1 and 7.
- ``bounds.py``: the node summaries computed at build time (``_summaries``) and the bound on
  |rho| they give at query time (``query_factors``, ``residual_bound``). docs/tree.md section 2.
- ``traversal.py``: one tile of queries walking the forest in Numba: the frontier heap, the
  pruning threshold, ``_traverse_tile`` and ``_traverse``; its constants (``DEFAULT_TILE_SIZE``,
  ``POP_BATCH``, ``COUNTERS``) and ``TraversalFlags``. docs/tree.md sections 4 and 5.
- ``leaf_filter.py``: the low-rank leaf filter (``TraversalFlags.filter_rank``): per leaf a rank-r
  basis of its V rows and per point a certified tail, so that the traversal drops most points of
  an evaluated leaf before their m-length products. docs/tree.md section 4c.
- ``searcher.py``: the host side. ``TreeSearcher`` binds a tree to its problem's arrays and
  answers ``select`` for the certified driver (search.exact_knn): routing, rounding margins
  (float32 leaves: section 4a), queries in Hilbert order (section 3); ``euclidean_search``.
- ``schedule.py``: ``BlockSchedule``, the same select as a few large requests to any backend
  (seed the nearest leaves, bound every leaf, sweep the survivors), which is how the tree runs
  on JAX and CUDA (``TraversalFlags.schedule``). docs/tree.md section 4b.

Nothing here computes a block of |rho| values: the fused traversal calls the CPU backend's leaf
blocks (backends/cpu.py, "the tree's leaf blocks": ``_eval_block``, ``_fold_block``), the block
schedule the backend's ``select_blocks`` and ``bound_products`` (backends/base.py).
"""

from .bounds import box_distances, query_factors, residual_bound
from .layout import (
    DEFAULT_LEAF_SIZE,
    DENSE_RATIO,
    LAYOUT_FIELDS,
    METRICS,
    TREE_FORMAT_VERSION,
    SearchTree,
    arrays_digest,
    block_bounds,
    build_euclidean_tree,
    build_forest,
    build_tree,
    euclidean_knn,
    transform_of,
)
from .searcher import TreeSearcher, euclidean_search
from .traversal import (
    COUNTERS,
    DEFAULT_TILE_SIZE,
    NCOUNTERS,
    NOADM,
    POP_BATCH,
    TraversalFlags,
)

__all__ = [
    "COUNTERS",
    "DEFAULT_LEAF_SIZE",
    "DEFAULT_TILE_SIZE",
    "DENSE_RATIO",
    "LAYOUT_FIELDS",
    "METRICS",
    "NCOUNTERS",
    "NOADM",
    "POP_BATCH",
    "TREE_FORMAT_VERSION",
    "SearchTree",
    "TraversalFlags",
    "TreeSearcher",
    "arrays_digest",
    "block_bounds",
    "box_distances",
    "build_euclidean_tree",
    "build_forest",
    "build_tree",
    "euclidean_knn",
    "euclidean_search",
    "query_factors",
    "residual_bound",
    "transform_of",
]
