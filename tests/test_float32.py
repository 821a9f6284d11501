"""The float32 fast pass of brute force (residual_gpu/brute.py): the same answers as float64,
bit for bit, on the randomised corpus of the core tests, on every backend present here (the
CuPy emulation has its own test in test_cuda_backend.py)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CASE_IDS, CASES, assert_float32_equals_float64, make_problem

import residual_gpu as rg
from residual_gpu.precision import FLOAT32_MAX_MARGIN

BACKENDS = [name for name in ("cpu", "jax") if rg.available_backends()[name][0]]


def float32_share(index, **kw) -> float:
    """Share of the queries whose float32 margin lets them take the float32 pass."""
    batch = index._batch(kw.get("queries"), kw.get("query_coords"), kw.get("predecessor", False))
    return float(np.mean(index._brute_select.float32_margins(batch) <= FLOAT32_MAX_MARGIN))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_query_kind(backend, case, seed):
    d, kernel_cls, ls, m = case
    problem = make_problem(seed, 240, d, kernel_cls(lengthscale=ls, variance=1.7), m)
    for predecessor in (False, True):
        index, _ = assert_float32_equals_float64(problem, 9, backend, predecessor=predecessor)
    # the float32 pass really runs (the smooth RBF case has p ~ 1e-3: its queries take the
    # float64 pass, which is what routing is for)
    assert float32_share(index) > 0.5 or kernel_cls is rg.RBF
    queries = np.random.default_rng(seed).integers(0, problem.n, 40)
    assert_float32_equals_float64(problem, 7, backend, queries=queries)
    assert_float32_equals_float64(problem, 7, backend, queries=queries, predecessor=True)
    xnew = np.random.default_rng(seed + 5).random((25, d))
    xnew[:2] = problem.coords[:2]
    assert_float32_equals_float64(problem, 11, backend, query_coords=xnew)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_up_to_n_minus_one(backend):
    problem = make_problem(3, 120, 2, rg.Matern32(lengthscale=0.2), 15)
    assert_float32_equals_float64(problem, problem.n - 1, backend)
    assert_float32_equals_float64(problem, problem.n - 1, backend, predecessor=True)
    assert_float32_equals_float64(problem, problem.n, backend, query_coords=np.random.default_rng(0).random((5, 2)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_clusters_and_tie_groups(backend):
    dup = make_problem(4, 200, 2, rg.RBF(lengthscale=0.2), 20, duplicates=60)
    assert_float32_equals_float64(dup, 12, backend)
    assert_float32_equals_float64(dup, 12, backend, predecessor=True)
    clustered = make_problem(5, 200, 3, rg.Matern52(lengthscale=0.05), 16, clustered=True)
    assert_float32_equals_float64(clustered, 15, backend)
    x = np.random.default_rng(5).random((150, 2))
    x[40:90] = x[40]  # a tie group straddling k: certification retries
    ties = rg.ResidualProblem(x, kernel=rg.Matern52(lengthscale=0.3), inducing=15)
    _, res = assert_float32_equals_float64(ties, 10, backend)
    assert res.telemetry.recertified_queries > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_residual_variance(backend):
    """The gold regime: the float32 margins are too wide, so the queries take the float64 pass;
    and precision="auto" keeps float64 there."""
    x = np.random.default_rng(42).normal(size=(400, 3))
    u = x[np.sort(np.random.default_rng(0).choice(400, 200, replace=False))]
    problem = rg.ResidualProblem(x, kernel=rg.RBF(lengthscale=1.0), inducing=u)
    queries = np.random.default_rng(43).integers(0, 400, 64)
    index, _ = assert_float32_equals_float64(problem, 20, backend, queries=queries)
    assert float32_share(index, queries=queries) < 0.5
    auto = rg.ResidualIndex(problem, backend=backend, method="brute")
    assert auto.precision == "float64" and "float64" in auto.precision_reason


def test_inducing_points_in_the_data_take_the_float64_share():
    """kmeans++ inducing points are data points with p ~ jitter: they are the float64 share of the
    candidates, so every other query keeps a narrow float32 margin."""
    problem = make_problem(6, 600, 3, rg.Matern52(lengthscale=0.15), 40)
    index = rg.ResidualIndex(problem, backend="cpu", method="brute", precision="float32")
    sel = index._brute_select
    assert set(problem.inducing_indices) <= set(sel.slow.ids)
    assert sel.slow.ids.size < 0.2 * problem.n and float32_share(index) > 0.9
    assert sel.fast.prepared.v.dtype == np.float32
    # the fast values really are float32's: not float64's, but within both margins of them
    batch = index._batch(None, None, False)
    c32 = sel(batch, 30)
    c64 = index._backend.select_candidates(index._prepared, batch, 30)
    a32 = np.sort(c32.abs_rho, axis=1)
    a64 = np.sort(c64.abs_rho, axis=1)
    assert np.count_nonzero(a32 != a64) > a32.size // 4
    assert c32.margin is not None and np.all(c32.margin > 0)
    assert np.all(np.abs(a32[:, -10:] - a64[:, -10:]) <= 2 * c32.margin[:, None])
    assert assert_float32_equals_float64(problem, 20, "cpu", predecessor=True)


def test_auto_picks_float32_on_vif_like_problems_and_records_why():
    index = rg.ResidualIndex(make_problem(7, 800, 3, rg.Matern52(lengthscale=0.1), 50), backend="cpu",
                             method="brute")
    assert index.precision == "float32" and "float32" in index.precision_reason
    with pytest.raises(rg.InvalidArgumentError, match="precision must be one of"):
        rg.ResidualIndex(index.problem, backend="cpu", precision="bfloat16")
