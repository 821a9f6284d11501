"""The search tree: build and layout (layout.py), traversal and the host searcher (traversal.py)."""

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
