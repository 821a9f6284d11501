"""Shared fixtures and the comparison helper for kNN results."""

from __future__ import annotations

import numpy as np
import pytest

import residual_gpu as rg
from residual_gpu.reference import (
    brute_knn_reference,
    distance_from_rho,
    residual_distance_reference,
    residual_rho_block,
)

KERNEL_CLASSES = [rg.RBF, rg.Matern12, rg.Matern32, rg.Matern52]
#: randomised problem shapes every backend is checked on: (d, kernel, lengthscale, m)
CASES = [
    (1, rg.Matern12, 0.2, 12),
    (2, rg.Matern52, 0.1, 30),
    (3, rg.RBF, 0.5, 40),
    (8, rg.Matern32, np.linspace(0.6, 1.6, 8), 25),  # ARD
]
CASE_IDS = [f"d{c[0]}-{c[1].__name__}" for c in CASES]
#: reference and engines may differ by a few ulp (numpy's exp vs libm's)
DIST_ATOL = 1e-12


def reference_distance_rows(problem, queries=None, query_coords=None) -> np.ndarray:
    """Full reference distance rows for the queries (dataset indices or new locations)."""
    cols = np.arange(problem.n)
    if query_coords is not None:
        xq, vq, pq = problem.factors_at(query_coords)
        return distance_from_rho(residual_rho_block(xq, vq, pq, problem.coords, problem.v, problem.p, problem.kernel))
    rows = cols if queries is None else np.asarray(queries)
    return residual_distance_reference(problem.coords, problem.v, problem.p, problem.kernel, rows, cols)


def assert_knn_equal(ref_idx, ref_dist, idx, dist, full_ref=None, atol=DIST_ATOL):
    """Same neighbours in the same order, distances to atol.

    An index may differ from the reference only where the reference itself has a near-tie:
    the returned neighbour's reference distance (from ``full_ref``) equals the expected
    distance within atol. With exact ties both sides break by the smaller index, so a
    difference there is a failure.
    """
    assert idx.shape == ref_idx.shape and dist.shape == ref_dist.shape
    assert idx.dtype == np.int64 and dist.dtype == np.float64
    np.testing.assert_array_equal(idx < 0, ref_idx < 0, err_msg="padding differs")
    np.testing.assert_array_equal(np.isinf(dist), ref_idx < 0, err_msg="padding distances must be inf")
    finite = ref_idx >= 0
    np.testing.assert_allclose(dist[finite], ref_dist[finite], rtol=0, atol=atol)
    bad = np.argwhere(idx != ref_idx)
    if bad.size:
        assert full_ref is not None, f"indices differ at {bad[:5].tolist()}"
        for r, c in bad:
            assert abs(full_ref[r, idx[r, c]] - ref_dist[r, c]) <= atol, (
                f"row {r} position {c}: got {idx[r, c]}, expected {ref_idx[r, c]} "
                f"(reference distances {full_ref[r, idx[r, c]]!r} vs {ref_dist[r, c]!r})"
            )
        # a near-tie swap must keep the row's set of distances
        for r in np.unique(bad[:, 0]):
            np.testing.assert_allclose(np.sort(full_ref[r, idx[r][idx[r] >= 0]]),
                                       np.sort(ref_dist[r][ref_idx[r] >= 0]), rtol=0, atol=atol)


def make_problem(seed: int, n: int, d: int, kernel, m: int, duplicates: int = 0, clustered: bool = False):
    rng = np.random.default_rng(seed)
    if clustered:
        centres = rng.random((4, d))
        x = centres[rng.integers(0, 4, n)] + 0.02 * rng.standard_normal((n, d))
    else:
        x = rng.random((n, d))
    if duplicates:
        x[rng.choice(n, duplicates, replace=False)] = x[rng.choice(n, duplicates)]
    return rg.ResidualProblem(x, kernel=kernel, inducing=m, seed=seed)


def _backend_param(name):
    usable, reason = rg.available_backends()[name]
    marks = [pytest.mark.skipif(not usable, reason=f"backend {name!r} unavailable: {reason}")]
    if name == "cuda":
        marks.append(pytest.mark.gpu)
    return pytest.param(name, marks=marks, id=name)


@pytest.fixture(params=[_backend_param(name) for name in rg.available_backends()])
def backend(request):
    """Every registered backend; the ones that cannot run here are skipped with the reason."""
    return request.param


@pytest.fixture(params=[0, 1, 2], ids=lambda s: f"seed{s}")
def seed(request):
    return request.param


def assert_matches_reference(problem, res, k, *, queries=None, query_coords=None, predecessor=False):
    """A KnnResult equals the float64 reference brute force for the same queries."""
    if query_coords is not None:
        xq, vq, pq = problem.factors_at(query_coords)
        ref = brute_knn_reference(problem.coords, problem.v, problem.p, problem.kernel, k,
                                  query_coords=xq, query_v=vq, query_p=pq)
    else:
        ref = brute_knn_reference(problem.coords, problem.v, problem.p, problem.kernel, k,
                                  queries=queries, predecessor=predecessor)
    assert_knn_equal(*ref, res.indices, res.distances, reference_distance_rows(problem, queries, query_coords))


def check_knn(problem, k, *, backend="cpu", queries=None, query_coords=None, predecessor=False):
    """Query through ``backend`` and compare with the reference; other backends must also
    equal "cpu" (identical indices, distances to 1e-12, same evaluation count)."""
    index = rg.ResidualIndex(problem, backend=backend, method="brute")
    assert index.backend == backend
    res = index.query(k, queries=queries, query_coords=query_coords, predecessor=predecessor)
    assert res.telemetry.backend == backend
    assert_matches_reference(problem, res, k, queries=queries, query_coords=query_coords, predecessor=predecessor)
    if backend != "cpu":
        cpu = rg.ResidualIndex(problem, backend="cpu", method="brute").query(
            k, queries=queries, query_coords=query_coords, predecessor=predecessor)
        np.testing.assert_array_equal(res.indices, cpu.indices)
        np.testing.assert_allclose(res.distances, cpu.distances, rtol=0, atol=1e-12)
        assert res.telemetry.distance_evaluations == cpu.telemetry.distance_evaluations
    return res


def assert_select_matches_cpu(problem, backend_name: str, predecessor: bool, keeps=(1, 5, 33, 149)):
    """A backend's streaming select against the CPU backend's on the same batch: kept sets equal
    as sets (no ties here), a_dropped equal, -1 padding, the query itself and inadmissible
    candidates excluded, the same evaluation count."""
    index = rg.ResidualIndex(problem, backend="cpu")
    batch = index._batch(np.array([0, 1, 2, 30, problem.n - 1, problem.n - 1, 75]), None, predecessor)
    cpu_be, fast_be = rg.get_backend("cpu"), rg.get_backend(backend_name)
    for keep in keeps:
        cpu = cpu_be.select_candidates(cpu_be.prepare(problem), batch, keep)
        fast = fast_be.select_candidates(fast_be.prepare(problem), batch, keep)
        assert fast.index.shape == (batch.size, keep) and fast.index.dtype == np.int64
        assert fast.abs_rho.dtype == np.float64 and fast.a_dropped.shape == (batch.size,)
        assert fast.evaluations == cpu.evaluations
        for r in range(batch.size):
            kept = fast.index[r] >= 0
            assert np.all(kept[: kept.sum()]), "kept candidates must be a prefix"
            assert np.all(fast.abs_rho[r, ~kept] == -1.0)
            assert set(fast.index[r, kept]) == set(cpu.index[r][cpu.index[r] >= 0])
            assert batch.self_index[r] not in set(fast.index[r])
            assert np.all(fast.index[r, kept] < batch.limit[r])
            np.testing.assert_allclose(np.sort(fast.abs_rho[r, kept]), np.sort(cpu.abs_rho[r][cpu.index[r] >= 0]),
                                       rtol=0, atol=1e-12)
        np.testing.assert_allclose(fast.a_dropped, cpu.a_dropped, rtol=0, atol=1e-12)
        assert np.array_equal(fast.a_dropped < 0, cpu.a_dropped < 0)
