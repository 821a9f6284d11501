"""Comparing the engine with the Rust oracle (``residual_gpu_ref``, built from rust_ref/).

The oracle re-implements brute force and, in the ``parity`` preset (docs/tree.md, "Parity
preset"), the tree: its build and its query, with the same counters. These helpers call it
on a ResidualProblem and say, field by field, where the two engines differ; the parity tests
and ``residual-gpu parity`` use them.
"""

from __future__ import annotations

import numpy as np

from .errors import BackendUnavailableError
from .tree import DENSE_RATIO, transform_of

#: Telemetry fields both engines report in the parity preset (docs/telemetry.md)
PARITY_COUNTERS = (
    "keep", "distance_evaluations", "accurate_evaluations", "recertified_queries", "block_requests",
    "tree_queries", "brute_queries", "nodes_visited", "bound_evaluations", "bound_products", "prunes_bound",
    "prunes_predecessor", "frontier_sum", "frontier_max", "rounds", "yields", "blocks", "block_pairs",
    "block_pairs_max", "leaves_evaluated", "dense_pairs",
)
#: SearchTree arrays the oracle's tree_build returns (and dense_cut, a float)
TREE_ARRAYS = ("perm", "node_start", "node_end", "node_left", "node_right", "node_lo", "node_hi", "node_min",
               "roots", "root_lo", "dense", "node_mid", "node_rad", "node_ymin", "node_ymax", "node_zeta",
               "node_zabs")


def load_oracle():
    """The ``residual_gpu_ref`` module, or BackendUnavailableError saying how to build it."""
    try:
        import residual_gpu_ref
    except ImportError as exc:
        raise BackendUnavailableError("the Rust oracle is not installed: pip install ./rust_ref") from exc
    return residual_gpu_ref


def oracle_brute_knn(oracle, problem, k: int, queries, predecessor: bool):
    """(indices, distances) of the oracle's float64 brute force."""
    return oracle.brute_knn(problem.coords, problem.v, problem.p, kernel=problem.kernel.name,
                            lengthscale=problem.lengthscales, variance=problem.kernel.variance, k=k,
                            queries=queries, predecessor=predecessor)


def oracle_tree_build(oracle, problem, preset: dict) -> dict:
    """The oracle's tree arrays for the problem, with the preset's leaf size."""
    return oracle.tree_build(problem.coords, problem.v, problem.p, transform_of(problem),
                             lengthscale=problem.lengthscales, leaf_size=preset["leaf_size"], dense_ratio=DENSE_RATIO)


def oracle_tree_knn(oracle, problem, k: int, queries, predecessor: bool, preset: dict):
    """(indices, distances, counters) of the oracle's tree query in the parity preset."""
    return oracle.tree_knn(problem.coords, problem.v, problem.p, transform_of(problem), kernel=problem.kernel.name,
                           lengthscale=problem.lengthscales, variance=problem.kernel.variance, k=k, queries=queries,
                           predecessor=predecessor, leaf_size=preset["leaf_size"], tile_size=preset["tile_size"],
                           pop_batch=preset["pop_batch"])


def tree_mismatches(tree, theirs: dict) -> list[str]:
    """Names of the tree arrays (and dense_cut) that are not bitwise equal to the oracle's."""
    bad = [name for name in TREE_ARRAYS
           if name not in theirs or not np.array_equal(getattr(tree, name), np.asarray(theirs[name]))]
    if float(theirs.get("dense_cut", np.nan)) != tree.dense_cut:
        bad.append("dense_cut")
    return bad


def counter_mismatches(telemetry, theirs: dict) -> dict:
    """{field: (engine, oracle)} for every parity counter that differs (missing ones as None)."""
    out = {}
    for name in PARITY_COUNTERS:
        ours = int(getattr(telemetry, name))
        other = theirs.get(name)
        if other is None or int(other) != ours:
            out[name] = (ours, other)
    return out
