"""Counters a search records, returned as ``KnnResult.telemetry`` and written as JSONL rows.

docs/telemetry.md documents every field with a sample row. Every row carries the schema id
and version; fields are only ever added (a reader of version 1 rows finds all its fields).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

SCHEMA = "residual_gpu.telemetry"
SCHEMA_VERSION = 5

#: tree counters summed over tiles (maxima are maxima); names match tree.traversal.COUNTERS
_TREE_SUMS = ("nodes_visited", "bound_evaluations", "bound_products", "prunes_bound", "prunes_predecessor",
              "frontier_sum", "rounds", "yields", "blocks", "block_pairs", "leaves_evaluated", "dense_pairs",
              "filter_pairs", "filter_drops", "filter_products")
_TREE_MAXES = ("frontier_max", "block_pairs_max")


@dataclass
class Telemetry:
    """What one query call did. Counts are totals over the call (all select passes)."""

    method: str = ""
    backend: str = ""
    queries: int = 0
    k: int = 0
    predecessor: bool = False
    #: candidates kept per query by the fast streaming select (first pass)
    keep: int = 0
    #: fast |rho| evaluations of (query, candidate) pairs, all passes (brute force: admissible
    #: pairs; tree: the pairs of every evaluated block, plus the brute-force-routed queries' pairs)
    distance_evaluations: int = 0
    #: accurate (compensated) re-evaluations of contenders during certification
    accurate_evaluations: int = 0
    #: queries searched again because the fast values could not certify their k-th neighbour
    recertified_queries: int = 0
    #: select passes handed to the method (one per query chunk and retry)
    block_requests: int = 0
    seconds: dict = field(default_factory=dict)
    # -- tree method (zero for brute force) -------------------------------------------
    #: queries answered by the tree / routed to brute force because their p is tiny
    tree_queries: int = 0
    brute_queries: int = 0
    brute_evaluations: int = 0
    #: nodes whose bounds were computed (each for every query of its tile)
    nodes_visited: int = 0
    #: (query, node) bounds computed, and the m-length dot products they cost (2 per bound)
    bound_evaluations: int = 0
    bound_products: int = 0
    #: (query, node) pairs dropped by the covariance + low-rank bound, and pairs skipped
    #: because the node holds no admissible point (predecessor bound; not a drop)
    prunes_bound: int = 0
    prunes_predecessor: int = 0
    #: frontier size summed over rounds, and its maximum; rounds of the traversal, and the
    #: rounds that yielded at least one block to the evaluator
    frontier_sum: int = 0
    frontier_max: int = 0
    rounds: int = 0
    yields: int = 0
    #: dense blocks evaluated (tile rows x leaf or dense-set columns), their summed and
    #: largest sizes in (query, candidate) pairs; leaves evaluated; pairs in dense-set blocks
    blocks: int = 0
    block_pairs: int = 0
    block_pairs_max: int = 0
    leaves_evaluated: int = 0
    dense_pairs: int = 0
    #: the low-rank leaf filter (TraversalFlags.filter_rank): (query, point) pairs it screened,
    #: those it dropped with its bound (the others are evaluated and counted in block_pairs), and
    #: what it cost in m-length dot products (the projections, and the rank-length products as
    #: their share of m)
    filter_pairs: int = 0
    filter_drops: int = 0
    filter_products: int = 0
    #: shape of the index's tree (0 for brute force)
    tree_nodes: int = 0
    tree_leaves: int = 0
    dense_points: int = 0
    #: precision of the tree's leaf-block fast values: "float64" or "float32" ("" for brute
    #: force); float32 values carry a wider certified margin (docs/tree.md, section 4a)
    leaf_precision: str = ""
    #: precision of the fast pass of either method ("float64" or "float32"; ResidualIndex's
    #: ``precision``); the answers are certified float64 in both
    precision: str = ""

    def add_seconds(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def add_tree(self, totals: dict) -> None:
        """Fold one traversal's counter totals in."""
        for name in _TREE_SUMS:
            setattr(self, name, getattr(self, name) + int(totals[name]))
        for name in _TREE_MAXES:
            setattr(self, name, max(getattr(self, name), int(totals[name])))

    def as_dict(self) -> dict:
        row = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION}
        row.update(asdict(self))
        return row

    def write_jsonl(self, path) -> None:
        """Append this record as one JSON line to ``path`` (created if missing)."""
        line = json.dumps(self.as_dict(), sort_keys=False)
        with open(os.fspath(path), "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
