"""Shared fixtures and the comparison helper for kNN results."""

from __future__ import annotations

import numpy as np
import pytest

import residual_gpu as rg
from residual_gpu.precision import (
    accurate_rho_error,
    candidate_maxima,
    distance_tolerance,
    float32_margins,
    query_margins,
)
from residual_gpu.reference import (
    distance_from_rho,
    residual_distance_reference,
    residual_rho_block,
    select_k_reference,
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


def reference_distance_rows(problem, queries=None, query_coords=None, kernel=None):
    """(full reference distance rows, admissible mask) for the queries (dataset indices, with the
    predecessor restriction applied by the caller, or new locations); ``kernel`` replaces the
    problem's kernel in the reference only."""
    kern = problem.kernel if kernel is None else kernel
    cols = np.arange(problem.n)
    if query_coords is not None:
        xq, vq, pq = problem.factors_at(query_coords)
        full = distance_from_rho(residual_rho_block(xq, vq, pq, problem.coords, problem.v, problem.p, kern))
        return full, np.ones(full.shape, dtype=bool)
    rows = cols if queries is None else np.asarray(queries)
    full = residual_distance_reference(problem.coords, problem.v, problem.p, kern, rows, cols)
    return full, rows[:, None] != cols[None, :]


def reference_tolerance(problem, full_ref, queries=None, query_coords=None) -> np.ndarray:
    """Per (query, point) pair, how far an engine's accurate distance may lie from the reference's:
    both sides' accurate_rho_error (the engine's exp and the reference's numpy exp may differ by a
    few ulp on any CPU), turned into distance by precision.distance_tolerance (docs/precision.md)."""
    if query_coords is not None:
        _, vq, pq = problem.factors_at(query_coords)
        q_vnorm, q_p = np.linalg.norm(vq, axis=1), pq
    else:
        rows = np.arange(problem.n) if queries is None else np.asarray(queries)
        q_vnorm, q_p = problem.v_norms[rows], problem.p[rows]
    e = accurate_rho_error(q_vnorm, problem.v_norms, q_p, problem.p, problem.m, problem.d, problem.kernel.variance)
    return distance_tolerance(full_ref, 2.0 * e)


def twin_groups(problem) -> np.ndarray:
    """For every point, the smallest index of the points with bitwise identical coordinates, V
    row and p (exact duplicates): their distances to any query are equal in every engine, so they
    must come out in index order."""
    rows = np.concatenate([problem.coords, problem.v, problem.p[:, None]], axis=1)
    _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    return first[inverse.ravel()]


def assert_knn_equal(ref_idx, ref_dist, idx, dist, full_ref, tol, admissible, twins=None):
    """The engine's (idx, dist) is the reference ranking (ref_idx, ref_dist) up to the documented
    error bounds; ``full_ref``, ``tol`` and ``admissible`` are (q, n): the reference distances, the
    per-pair tolerance (reference_tolerance) and which points each query may return.

    - each returned distance is the returned point's reference distance within its tolerance,
      and each row is sorted by (distance, index);
    - a position may hold another index than the reference's only where the two reference
      distances are within both tolerances of each other (a near-tie), and the returned set may
      differ from the reference's top k only by points within tolerance of the k-th distance;
    - exact ties (``twins``: identical points) go to the smaller index: a returned point's
      admissible twins of smaller index are returned before it.
    """
    assert idx.shape == ref_idx.shape and dist.shape == ref_dist.shape
    assert idx.dtype == np.int64 and dist.dtype == np.float64
    np.testing.assert_array_equal(idx < 0, ref_idx < 0, err_msg="padding differs")
    np.testing.assert_array_equal(np.isinf(dist), ref_idx < 0, err_msg="padding distances must be inf")
    for r in range(idx.shape[0]):
        cnt = int(np.count_nonzero(ref_idx[r] >= 0))
        got, want = idx[r, :cnt], ref_idx[r, :cnt]
        assert np.all(admissible[r, got]), f"row {r}: inadmissible neighbour in {got.tolist()}"
        assert np.unique(got).size == cnt, f"row {r}: repeated neighbour in {got.tolist()}"
        err = np.abs(dist[r, :cnt] - full_ref[r, got])
        assert np.all(err <= tol[r, got]), (
            f"row {r}: distances off the reference by {err.max():.3g} > tolerance "
            f"{tol[r, got][np.argmax(err - tol[r, got])]:.3g} (points {got.tolist()})")
        order = np.lexsort((got, dist[r, :cnt]))
        assert np.array_equal(order, np.arange(cnt)), f"row {r}: not sorted by (distance, index)"
        for c in np.flatnonzero(got != want):
            gap = abs(full_ref[r, got[c]] - ref_dist[r, c])
            assert gap <= tol[r, got[c]] + tol[r, want[c]], (
                f"row {r} position {c}: got {got[c]}, expected {want[c]} (reference distances "
                f"{full_ref[r, got[c]]!r} vs {ref_dist[r, c]!r}, apart by {gap:.3g})")
        if cnt:
            kth, kth_tol = ref_dist[r, cnt - 1], tol[r, want[cnt - 1]]
            for j in np.setdiff1d(got, want):
                assert full_ref[r, j] - tol[r, j] <= kth + kth_tol, f"row {r}: {j} is not a near-tie of the k-th"
            for j in np.setdiff1d(want, got):
                assert full_ref[r, j] + tol[r, j] >= kth - kth_tol, f"row {r}: missed {j}, clearly in the top k"
        if twins is not None:
            pos = {int(j): c for c, j in enumerate(got)}
            for c, j in enumerate(got):
                for t in np.flatnonzero((twins == twins[j]) & admissible[r]):
                    if t < j:
                        assert pos.get(int(t), cnt) < c, f"row {r}: {j} returned before its twin {t} (an exact tie)"


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


def bound_test_problem(seed, n, d, kernel, ls, m, ard, dupes, tiny_p):
    """(problem, rng) for the bound property tests: n uniform points in d dimensions, ``dupes``
    duplicated, ARD lengthscales around ``ls`` if ``ard``, a random variance, and m kmeans++
    inducing points or (``tiny_p``) m data points as inducing points; None where K(U, U) is not
    positive definite (duplicated inducing points)."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, d))
    if dupes:
        x[rng.choice(n, min(dupes, n), replace=False)] = x[rng.choice(n, min(dupes, n))]
    lengthscale = ls * rng.uniform(0.5, 2.0, d) if ard else ls
    m = min(m, n)
    inducing = x[np.sort(rng.choice(n, m, replace=False))] if tiny_p else m
    try:
        problem = rg.ResidualProblem(x, kernel=kernel(lengthscale=lengthscale, variance=rng.uniform(0.3, 3.0)),
                                     inducing=inducing, seed=seed % 100)
    except rg.InvalidArgumentError:
        return None, rng
    return problem, rng


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


def assert_matches_reference(problem, res, k, *, queries=None, query_coords=None, predecessor=False, kernel=None):
    """A KnnResult equals the float64 reference brute force for the same queries, within the
    documented error bounds (assert_knn_equal). ``kernel`` replaces the problem's kernel in the
    reference only (tests of this helper perturb the reference's kernel values with it)."""
    full, admissible = reference_distance_rows(problem, queries, query_coords, kernel)
    if predecessor:
        rows = np.arange(problem.n) if queries is None else np.asarray(queries)
        admissible &= np.arange(problem.n)[None, :] < rows[:, None]
    ref = select_k_reference(full, admissible, k)
    tol = reference_tolerance(problem, full, queries, query_coords)
    assert_knn_equal(*ref, res.indices, res.distances, full, tol, admissible, twin_groups(problem))


def check_knn(problem, k, *, backend="cpu", queries=None, query_coords=None, predecessor=False):
    """Query through ``backend`` and compare with the reference; other backends must also
    equal "cpu" (identical indices and distances, same evaluation count)."""
    index = rg.ResidualIndex(problem, backend=backend, method="brute")
    assert index.backend == backend
    res = index.query(k, queries=queries, query_coords=query_coords, predecessor=predecessor)
    assert res.telemetry.backend == backend
    assert_matches_reference(problem, res, k, queries=queries, query_coords=query_coords, predecessor=predecessor)
    if backend != "cpu":
        cpu = rg.ResidualIndex(problem, backend="cpu", method="brute").query(
            k, queries=queries, query_coords=query_coords, predecessor=predecessor)
        # certification runs on the host for every backend: the same accurate values, bit for bit
        np.testing.assert_array_equal(res.indices, cpu.indices)
        np.testing.assert_array_equal(res.distances, cpu.distances)
        assert res.telemetry.distance_evaluations == cpu.telemetry.distance_evaluations
    return res


def fast_value_tolerance(problem, batch, dtype=np.float64) -> np.ndarray:
    """(q, 1): how far two backends' fast |rho| values for the same pair may differ: each lies
    within its query's certification margin E_i of the exact value (precision.query_margins,
    plus precision.float32_margins for a float32 fast pass), so the two within 2 E_i, whatever
    GEMM, exp or device computed them."""
    maxima = candidate_maxima(problem.v_norms, problem.p)
    args = (batch.v_norms, batch.p, *maxima, problem.m, problem.d, problem.kernel.variance)
    e = query_margins(*args)
    if np.dtype(dtype) == np.float32:
        e = e + float32_margins(*args)
    return 2.0 * e[:, None]


def assert_select_matches_cpu(problem, backend_name: str, predecessor: bool, keeps=(1, 5, 33, 149)):
    """A backend's streaming select against the CPU backend's on the same batch: kept sets equal
    as sets (no near-ties here), values and a_dropped within fast_value_tolerance, -1 padding, the query itself and inadmissible
    candidates excluded, the same evaluation count."""
    index = rg.ResidualIndex(problem, backend="cpu")
    batch = index._batch(np.array([0, 1, 2, 30, problem.n - 1, problem.n - 1, 75]), None, predecessor)
    cpu_be, fast_be = rg.get_backend("cpu"), rg.get_backend(backend_name)
    tol = fast_value_tolerance(problem, batch)
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
                                       rtol=0, atol=tol[r, 0])
        assert np.all(np.abs(fast.a_dropped - cpu.a_dropped) <= tol[:, 0])
        assert np.array_equal(fast.a_dropped < 0, cpu.a_dropped < 0)


def assert_float32_equals_float64(problem, k, backend="cpu", **kw):
    """Brute force with a float32 fast pass returns float64's indices and distances, bit for bit."""
    f64 = rg.ResidualIndex(problem, backend=backend, method="brute", precision="float64").query(k, **kw)
    index = rg.ResidualIndex(problem, backend=backend, method="brute", precision="float32")
    f32 = index.query(k, **kw)
    assert f64.telemetry.precision == "float64" and f32.telemetry.precision == "float32"
    np.testing.assert_array_equal(f32.indices, f64.indices)
    np.testing.assert_array_equal(f32.distances, f64.distances)
    # a query is searched again at most until keep covers every candidate (4x per retry)
    tel = f32.telemetry
    assert 0 <= tel.recertified_queries <= tel.queries * (1 + int(np.log(max(problem.n, 2)) / np.log(4)) + 1)
    return index, f32
