"""Cross-engine parity: every available Python backend against the Rust oracle.

Deterministic problems (1,000 points, 64 queries, k = 1..10, d in {1, 2, 3, 8}, several
seeds and kernels, predecessor on and off). The engines must return identical indices in
the same order and bitwise identical distances: both evaluate the accurate formula in the
same fixed order with the same project-defined exp (portable_exp), no BLAS, no SIMD-dispatched
library function and no FMA contraction (docs/precision.md, "Portable accurate values"), so
nothing on the path depends on the CPU. The tree in the ``parity`` preset must also be built
identically (every array bitwise) and report identical telemetry counters. The inducing points
are locations off the data (a seeded uniform sample). CI runs this file a second time under
another CPU dispatch (.ci/run).

In CI (CI=true) the oracle must be built: a missing crate fails instead of skipping.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import residual_gpu as rg
from residual_gpu.index import PRESETS
from residual_gpu.parity import (
    counter_mismatches,
    oracle_brute_knn,
    oracle_tree_build,
    oracle_tree_knn,
    tree_mismatches,
)
from residual_gpu.precision import accurate_rho_error, distance_tolerance

try:
    import residual_gpu_ref as oracle
except ImportError:  # pragma: no cover - depends on the environment
    if os.environ.get("CI", "").lower() == "true":
        raise RuntimeError("CI must build the Rust oracle (pip install ./rust_ref) so parity tests run") from None
    pytest.skip("Rust oracle not installed (pip install ./rust_ref)", allow_module_level=True)

BACKENDS = [name for name, (usable, _) in rg.available_backends().items() if usable]
CASES = [  # (seed, d, kernel, lengthscale)
    (0, 1, rg.Matern12, 0.05),
    (1, 2, rg.Matern52, 0.08),
    (2, 3, rg.RBF, 0.2),
    (3, 8, rg.Matern32, np.linspace(0.4, 1.2, 8)),
    (4, 2, rg.RBF, np.array([0.05, 0.15])),
    (5, 3, rg.Matern52, 0.15),
]


def parity_problem(seed, d, kernel, lengthscale):
    rng = np.random.default_rng(seed)
    x = rng.random((1000, d))
    x[500:520] = x[:20]  # exact duplicates: ties must break by index in every engine
    u = np.random.default_rng(seed + 100).random((24, d))
    return rg.ResidualProblem(x, kernel=kernel(lengthscale=lengthscale, variance=1.3), inducing=u)


PARITY = PRESETS["parity"]


def oracle_knn(problem, k, queries, predecessor):
    return oracle_brute_knn(oracle, problem, k, queries, predecessor)


def parity_queries(seed):
    queries = np.random.default_rng(seed + 200).integers(0, 1000, 64).astype(np.int64)
    queries[:4] = [0, 1, 500, 999]  # first points (padding in predecessor mode) and a duplicate
    return queries


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("predecessor", [False, True], ids=["plain", "pred"])
@pytest.mark.parametrize("case", CASES, ids=[f"seed{c[0]}-d{c[1]}-{c[2].__name__}" for c in CASES])
def test_engine_matches_oracle(backend, predecessor, case):
    problem = parity_problem(*case)
    queries = parity_queries(case[0])
    index = rg.ResidualIndex(problem, backend=backend, method="brute")
    assert index.backend == backend
    for k in (1, 4, 10):
        ref_idx, ref_dist = oracle_knn(problem, k, queries, predecessor)
        res = index.query(k, queries=queries, predecessor=predecessor)
        np.testing.assert_array_equal(res.indices, ref_idx)
        np.testing.assert_array_equal(res.distances, ref_dist)  # inf padding included


def test_distance_blocks_match_oracle():
    problem = parity_problem(*CASES[2])
    rows = np.arange(0, 1000, 37, dtype=np.int64)
    cols = np.arange(1000, dtype=np.int64)
    theirs = oracle.residual_distance_block(problem.coords, problem.v, problem.p, rows, cols,
                                            kernel=problem.kernel.name, lengthscale=problem.lengthscales,
                                            variance=problem.kernel.variance)
    from residual_gpu.reference import residual_distance_reference

    ours = residual_distance_reference(problem.coords, problem.v, problem.p, problem.kernel, rows, cols)
    # the numpy reference's exp is numpy's (SIMD-dispatched): within the documented bound only
    e = accurate_rho_error(problem.v_norms[rows], problem.v_norms, problem.p[rows], problem.p, problem.m,
                           problem.d, problem.kernel.variance)
    assert np.all(np.abs(ours - theirs) <= distance_tolerance(ours, 2.0 * e))


def assert_tree_parity(index, problem, k, queries, predecessor):
    """Engine (parity preset) and oracle: same neighbours, distances, counters; both exact."""
    res = index.query(k, queries=queries, predecessor=predecessor)
    ref_idx, ref_dist, counters = oracle_tree_knn(oracle, problem, k, queries, predecessor, PARITY)
    np.testing.assert_array_equal(res.indices, ref_idx)
    np.testing.assert_array_equal(res.distances, ref_dist)
    assert counter_mismatches(res.telemetry, counters) == {}
    # and both are the exact answer (the oracle's brute force)
    brute_idx, _ = oracle_knn(problem, k, queries, predecessor)
    np.testing.assert_array_equal(ref_idx, brute_idx)
    return res, counters


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("predecessor", [False, True], ids=["plain", "pred"])
@pytest.mark.parametrize("case", CASES, ids=[f"seed{c[0]}-d{c[1]}-{c[2].__name__}" for c in CASES])
def test_tree_matches_oracle(backend, predecessor, case):
    problem = parity_problem(*case)
    index = rg.ResidualIndex(problem, backend=backend, method="tree", preset="parity")
    assert tree_mismatches(index.tree, oracle_tree_build(oracle, problem, PARITY)) == []
    queries = parity_queries(case[0])
    for k in (1, 4, 10):
        _, counters = assert_tree_parity(index, problem, k, queries, predecessor)
        # the counters are not vacuous: the tree pruned and evaluated
        assert counters["prunes_bound"] > 0 and 0 < counters["block_pairs"] < queries.size * 999


@pytest.mark.parametrize("variant", ["inducing-in-data", "no-inducing", "all-points"])
def test_tree_matches_oracle_special_problems(variant):
    """Tiny p (inducing points among the data: a dense set, tiny-p queries, retries), the identity
    transform (factors without inducing points) and every point as a query."""
    rng = np.random.default_rng(11)
    x = rng.random((1000, 2))
    x[700:710] = x[:10]
    kern = rg.Matern32(lengthscale=0.1, variance=0.8)
    queries = parity_queries(11)
    if variant == "inducing-in-data":
        problem = rg.ResidualProblem(x, kernel=kern, inducing=x[::40].copy())
    elif variant == "no-inducing":
        base = rg.ResidualProblem(x, kernel=kern, inducing=np.random.default_rng(12).random((16, 2)))
        problem = rg.ResidualProblem.from_factors(x, v=base.v, p=base.p, kernel=kern)
        assert problem.chol is None
    else:
        problem = parity_problem(*CASES[1])
        queries = None
    index = rg.ResidualIndex(problem, backend="cpu", method="tree", preset="parity")
    assert tree_mismatches(index.tree, oracle_tree_build(oracle, problem, PARITY)) == []
    if variant == "inducing-in-data":
        assert index.tree.dense.size > 0
    for predecessor in (False, True):
        for k in (2, 9):
            assert_tree_parity(index, problem, k, queries, predecessor)


def test_parity_command_reports_identical_engines():
    """`residual-gpu parity` runs both methods on a suite and reports no divergence."""
    from click.testing import CliRunner

    from residual_gpu.cli import main
    from residual_gpu.parity import PARITY_COUNTERS

    runner = CliRunner()
    result = runner.invoke(main, ["parity", "--suite", "smoke", "--n", "700", "--backend", "cpu", "--json"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {(r["method"], r["predecessor"]) for r in data["rows"]} == {("brute", True), ("tree", True)}
    for row in data["rows"]:
        assert row["rows_identical"] == row["rows"] == 700
        assert row["max_abs_distance_difference"] == 0.0
        if row["method"] == "tree":
            assert row["tree_arrays_differing"] == [] and row["counters_differing"] == {}
            assert set(row["oracle_counters"]) == set(PARITY_COUNTERS)
    table = runner.invoke(main, ["parity", "--suite", "smoke", "--n", "300", "--method", "tree", "--backend", "cpu"])
    assert table.exit_code == 0, table.output
    assert "| identical | 21 identical" in table.output
