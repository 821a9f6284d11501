"""Exact brute force against the float64 reference, on randomised problems.

The tests taking the ``backend`` fixture run on every backend that can run here; the
JAX and CuPy modules add what is specific to them (tiling, device handling).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CASE_IDS, CASES, KERNEL_CLASSES, check_knn, make_problem

import residual_gpu as rg
import residual_gpu.backends.cpu as cpu_backend
from residual_gpu import search


@pytest.mark.parametrize("d,kernel,ls,m", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("predecessor", [False, True], ids=["plain", "pred"])
def test_all_points(seed, d, kernel, ls, m, predecessor):
    problem = make_problem(seed, 180, d, kernel(lengthscale=ls, variance=1.7), m)
    for k in (1, 7, 40):
        check_knn(problem, k, predecessor=predecessor)


@pytest.mark.parametrize("d,kernel,ls,m", CASES, ids=CASE_IDS)
def test_query_indices_with_repeats(seed, d, kernel, ls, m):
    problem = make_problem(seed, 150, d, kernel(lengthscale=ls), m)
    queries = np.random.default_rng(seed + 10).integers(0, 150, 40)
    check_knn(problem, 9, queries=queries)
    res = check_knn(problem, 9, queries=queries, predecessor=True)
    # padded rows: query i has only i predecessors
    small = queries < 9
    assert np.all((res.indices[small] >= 0).sum(axis=1) == queries[small])


@pytest.mark.parametrize("d,kernel,ls,m", CASES, ids=CASE_IDS)
def test_query_coords(seed, d, kernel, ls, m):
    problem = make_problem(seed, 150, d, kernel(lengthscale=ls), m)
    rng = np.random.default_rng(seed + 20)
    xnew = rng.random((30, d))
    xnew[:3] = problem.coords[:3]  # new locations on top of data points
    check_knn(problem, 11, query_coords=xnew)
    check_knn(problem, 150, query_coords=xnew)  # every point


@pytest.mark.parametrize("predecessor", [False, True], ids=["plain", "pred"])
def test_k_up_to_admissible_maximum(predecessor, backend):
    problem = make_problem(3, 60, 2, rg.Matern32(lengthscale=0.3), 10)
    for k in (1, 2, 30, 58, 59):
        check_knn(problem, k, predecessor=predecessor, backend=backend)
    if predecessor:
        res = check_knn(problem, 59, predecessor=True, backend=backend)  # early rows have fewer: padded
        assert np.all((res.indices >= 0).sum(axis=1) == np.arange(60))


@pytest.mark.parametrize("kernel", KERNEL_CLASSES, ids=lambda c: c.__name__)
def test_duplicated_points_tie_by_index(kernel, backend):
    problem = make_problem(4, 160, 2, kernel(lengthscale=0.2), 20, duplicates=60)
    res = check_knn(problem, 12, backend=backend)
    check_knn(problem, 12, predecessor=True, backend=backend)
    # exact duplicates are at distance 0 from each other, listed by index
    x = problem.coords
    for i in range(problem.n):
        twins = np.flatnonzero(np.all(x == x[i], axis=1))
        twins = twins[twins != i]
        if 0 < twins.size <= 12:
            np.testing.assert_array_equal(res.indices[i, : twins.size], twins)
            assert np.all(res.distances[i, : twins.size] == 0.0)


def test_many_exact_ties_force_retries(monkeypatch, backend):
    """A point repeated 50 times: the tie group straddles k, certification must retry."""
    x = np.random.default_rng(5).random((120, 2))
    x[40:90] = x[40]
    problem = rg.ResidualProblem(x, kernel=rg.Matern52(lengthscale=0.3), inducing=15)
    res = check_knn(problem, 10, backend=backend)
    assert res.telemetry.recertified_queries > 0
    monkeypatch.setattr(search, "CANDIDATE_SLOTS", 64)  # retries go a few queries at a time
    check_knn(problem, 10, predecessor=True, backend=backend)


def test_clustered_data(seed):
    problem = make_problem(seed, 200, 3, rg.Matern52(lengthscale=0.05), 16, clustered=True)
    check_knn(problem, 15)
    check_knn(problem, 15, predecessor=True)


def test_tiny_residual_variance(backend):
    """The gold regime: inducing points are data points, p ~ 1e-6, heavy cancellation."""
    x = np.random.default_rng(42).normal(size=(400, 3))
    u = x[np.sort(np.random.default_rng(0).choice(400, 200, replace=False))]
    problem = rg.ResidualProblem(x, kernel=rg.RBF(lengthscale=1.0), inducing=u)
    assert np.median(problem.p) < 1e-5
    queries = np.random.default_rng(43).integers(0, 400, 64)
    check_knn(problem, 20, queries=queries, backend=backend)
    check_knn(problem, 20, queries=queries, predecessor=True, backend=backend)


def test_tiling_and_chunking(monkeypatch):
    """Small tiles and chunks: every boundary of the streaming select is crossed."""
    monkeypatch.setattr(cpu_backend, "QUERY_TILE", 7)
    monkeypatch.setattr(cpu_backend, "CANDIDATE_TILE", 13)
    monkeypatch.setattr(search, "QUERY_CHUNK", 19)
    problem = make_problem(6, 130, 2, rg.Matern32(lengthscale=0.15), 14, duplicates=10)
    check_knn(problem, 6)
    check_knn(problem, 6, predecessor=True)
    check_knn(problem, 6, queries=np.array([129, 0, 5, 5, 77]))


def test_minimal_keep_still_exact(monkeypatch):
    """With no slack kept, near-ties fail certification and are searched again."""
    monkeypatch.setattr(search, "initial_keep", lambda k: k)
    problem = make_problem(7, 150, 2, rg.Matern12(lengthscale=0.1), 12, duplicates=30)
    res = check_knn(problem, 5)
    assert res.telemetry.keep == 5
    check_knn(problem, 5, predecessor=True)


def test_inputs_unchanged_and_dtypes():
    rng = np.random.default_rng(8)
    x64 = rng.random((120, 2))
    xf = np.asfortranarray(x64)
    x32 = x64.astype(np.float32)
    queries = np.array([3, 1, 4, 1, 5], dtype=np.int32)
    copies = [a.copy() for a in (x64, xf, x32, queries)]
    kern = rg.Matern52(lengthscale=0.2)
    i64, d64 = rg.residual_knn(x64, 5, kern, inducing=10, queries=queries)
    i_f, d_f = rg.residual_knn(xf, 5, kern, inducing=10, queries=queries)
    np.testing.assert_array_equal(i64, i_f)
    np.testing.assert_array_equal(d64, d_f)
    i32, _ = rg.residual_knn(x32, 5, kern, inducing=10, queries=queries)
    assert i32.shape == (5, 5)
    ints = rg.residual_knn((x64 * 10).astype(np.int64), 5, rg.Matern52(lengthscale=2.0), inducing=10)
    assert ints[0].shape == (120, 5)
    strided = np.random.default_rng(9).random((240, 2))[::2]
    rg.residual_knn(strided, 5, kern, inducing=10)
    for before, after in zip(copies, (x64, xf, x32, queries)):
        np.testing.assert_array_equal(before, after)


def test_results_are_sorted_and_exclude_self(seed):
    problem = make_problem(seed, 200, 2, rg.RBF(lengthscale=0.1), 20)
    res = rg.ResidualIndex(problem, backend="cpu").query(25)
    assert np.all(np.diff(res.distances, axis=1) >= 0)
    assert not np.any(res.indices == np.arange(200)[:, None])
    assert np.all((res.distances >= 0) & (res.distances <= 1))
    # every query streams all 199 others, and a query searched again with a larger keep does so again
    assert res.telemetry.distance_evaluations == (200 + res.telemetry.recertified_queries) * 199
