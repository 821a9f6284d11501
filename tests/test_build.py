"""Building a problem: the fused V pass against numpy's float64 formula within the documented
bound (docs/precision.md, "The problem's factors"), its portable kernel values bit for bit,
kmeans++ against the numpy implementation of 0.1, Lloyd kmeans, the default inducing count,
and ResidualProblem.with_kernel."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import assert_matches_reference
from numba import njit
from test_determinism import thread_counts

import residual_gpu as rg
from residual_gpu._linalg import cross_factors
from residual_gpu._numba_math import (
    correlation,
    dot2,
    portable_exp,
    portable_exp_nonpositive_inplace,
    row_norms,
    scaled_sq_distance,
)
from residual_gpu.cli import main
from residual_gpu.errors import InvalidArgumentError
from residual_gpu.inducing import KMEANS_MAX_ITER, _pairwise_sum, _update_centres, kmeans_centres, kmeanspp_indices
from residual_gpu.precision import gamma, kernel_error
from residual_gpu.problem import DEFAULT_JITTER, DEFAULT_P_FLOOR, default_inducing

KERNELS = [rg.RBF(0.3, 1.5), rg.Matern12(0.2), rg.Matern32([0.25, 0.5, 0.4], 0.7), rg.Matern52(0.1, 2.0)]
TWO_THREADS = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="Numba has fewer than 2 threads here")


def kmeanspp_numpy(coords, m, seed):
    """residual_gpu 0.1's kmeans++ (numpy), kept as the reference of the Numba version's choices."""
    n = coords.shape[0]
    rng = np.random.default_rng(seed)
    chosen = np.empty(m, dtype=np.int64)
    taken = np.zeros(n, dtype=bool)
    chosen[0] = rng.integers(n)
    taken[chosen[0]] = True
    nearest = np.sum((coords - coords[chosen[0]]) ** 2, axis=1)
    for c in range(1, m):
        weights = np.where(taken, 0.0, nearest)
        total = weights.sum()
        if total > 0:
            nxt = int(np.searchsorted(np.cumsum(weights), rng.random() * total, side="right"))
            nxt = min(nxt, n - 1)
            if taken[nxt]:
                nxt = int(np.flatnonzero(~taken)[-1])
        else:
            nxt = int(rng.choice(np.flatnonzero(~taken)))
        chosen[c] = nxt
        taken[nxt] = True
        np.minimum(nearest, np.sum((coords - coords[nxt]) ** 2, axis=1), out=nearest)
    return chosen


@njit(fastmath=False)
def _portable_exp_each(z):
    out = np.empty_like(z)
    for i in range(z.shape[0]):
        out[i] = portable_exp(z[i])
    return out


@njit(fastmath=False)
def _portable_exp_lanes(z):
    out = z.copy()
    portable_exp_nonpositive_inplace(out, np.empty_like(z))
    return out


@njit(fastmath=False)
def _accurate_cross_covariance(x, u, scale, kernel_id, variance):
    out = np.empty((x.shape[0], u.shape[0]))
    for i in range(x.shape[0]):
        for a in range(u.shape[0]):
            out[i, a] = variance * correlation(kernel_id, scaled_sq_distance(u[a], x[i], scale))
    return out


@njit(fastmath=False)
def _residual_variances(v, variance, floor):
    """p_i = max(variance - ||V_i||^2, floor) with ||V_i||^2 from Dot2, one row at a time."""
    out = np.empty(v.shape[0])
    for i in range(v.shape[0]):
        hi, lo = dot2(v[i], v[i])
        out[i] = max(floor, (variance - hi) - lo)
    return out


def numpy_factors(x, kernel, u, jitter=DEFAULT_JITTER, p_floor=DEFAULT_P_FLOOR):
    """0.1's float64 formula: K(U, X) from numpy's exp, L from the problem's Cholesky, V by
    forward substitution (numpy's dot products), p = max(variance - ||V_i||^2, floor)."""
    kuu = kernel(u)
    kuu[np.diag_indices_from(kuu)] += jitter * kernel.variance
    chol = np.linalg.cholesky(kuu)
    b = kernel(u, x)
    y = np.empty_like(b)
    for a in range(u.shape[0]):
        y[a] = (b[a] - chol[a, :a] @ y[:a]) / chol[a, a]
    v = y.T
    return chol, v, np.maximum(kernel.variance - np.einsum("ij,ij->i", v, v), p_floor * kernel.variance)


def factor_bound(chol, v, kernel, d):
    """docs/precision.md: |V - V'| <= |L^-1| (2 kerr variance + 2 gamma_m |L| |V_i|) per entry for two
    substitutions from kernel values each within kernel_error; p's bound follows from it."""
    m = chol.shape[0]
    absinv = np.abs(np.linalg.inv(chol))
    rhs = 2 * kernel_error(d) * kernel.variance + 2 * gamma(m) * (np.abs(chol) @ np.abs(v).T)
    dv = 1.01 * (absinv @ rhs).T
    vn = np.linalg.norm(v, axis=1)
    dvn = np.linalg.norm(dv, axis=1)
    dp = 2 * vn * dvn + dvn**2 + gamma(m) * vn**2 + 4 * 2.0**-53 * kernel.variance
    return dv, dp


# --------------------------------------------------------------------------------------
# the kernel values and V
# --------------------------------------------------------------------------------------


def test_lane_exp_is_portable_exp_bit_for_bit():
    rng = np.random.default_rng(0)
    z = np.concatenate([-rng.random(50_000) * 708, -rng.random(1000) * 1e-12, -708 - rng.random(100),
                        [0.0, -0.0, -708.0, np.nextafter(-708.0, 0), np.nextafter(-708.0, -1), -745.2, -1e300, -np.inf]])
    z = np.concatenate([z, z[:37]])  # an odd length
    np.testing.assert_array_equal(_portable_exp_lanes(z), _portable_exp_each(z), strict=True)


@pytest.mark.parametrize("kernel", KERNELS, ids=repr)
@pytest.mark.parametrize("m", [1, 8, 13])
def test_kernel_values_are_the_accurate_paths_bit_for_bit(kernel, m):
    """With L = I the pass returns K(X, U) itself: the accurate path's kernel value, bitwise."""
    rng = np.random.default_rng(m)
    x, u = rng.random((77, 3)), rng.random((m, 3))
    got, _, _ = cross_factors(np.eye(m), u, x, kernel, DEFAULT_P_FLOOR)
    want = _accurate_cross_covariance(x, u, kernel.lengthscales(3), kernel.kernel_id, kernel.variance)
    np.testing.assert_array_equal(got, want, strict=True)
    assert np.max(np.abs(got - kernel(x, u))) <= 2 * kernel_error(3) * kernel.variance


@pytest.mark.parametrize("kernel", KERNELS, ids=repr)
@pytest.mark.parametrize("case", ["data-inducing", "given-inducing"])
def test_v_and_p_within_the_documented_bound_of_numpy(kernel, case):
    rng = np.random.default_rng(7)
    x = rng.random((333, 3))
    u = x[rng.choice(333, 45, replace=False)] if case == "data-inducing" else rng.random((45, 3))
    prob = rg.ResidualProblem(x, kernel=kernel, inducing=u)
    chol, v, p = numpy_factors(x, kernel, u)
    dv, dp = factor_bound(chol, v, kernel, 3)
    err_v = np.abs(prob.v - v)
    assert np.all(err_v <= dv), f"V off by {np.max(err_v / dv):.3g} x its bound"
    assert np.all(np.abs(prob.p - p) <= dp)
    assert np.count_nonzero(prob.v != v) > 0  # another exp: not the numpy formula in disguise
    if case == "data-inducing":  # the tiny-p regime: p ~ jitter at the inducing points
        assert np.min(prob.p) < 1e-5 * kernel.variance


@pytest.mark.parametrize("m", [3, 16, 45])
def test_p_and_norms_are_dot2_and_row_norms_of_v_bit_for_bit(m):
    rng = np.random.default_rng(m)
    x = rng.random((1234, 2))
    x[:m] = np.repeat(x[:1], m, axis=0) + 1e-9 * rng.random((m, 2))  # near-duplicates: tiny p
    prob = rg.ResidualProblem(x, kernel=rg.RBF(0.5, 3.0), inducing=x[m - 1:2 * m - 1], p_floor=1e-5)
    np.testing.assert_array_equal(prob.p, _residual_variances(prob.v, 3.0, 1e-5 * 3.0), strict=True)
    np.testing.assert_array_equal(prob.v_norms, row_norms(prob.v), strict=True)
    assert np.any(prob.p == 1e-5 * 3.0) and np.any(prob.p > 1e-5 * 3.0)


def test_factors_at_data_points_are_their_v_rows_bit_for_bit():
    x = np.random.default_rng(8).random((500, 2))
    prob = rg.ResidualProblem(x, kernel=rg.Matern32(0.2), inducing=21, seed=3)
    for rows in (np.arange(500), np.array([7]), np.arange(3, 500, 7), np.array([499, 0, 250])):
        _, vq, pq = prob.factors_at(x[rows])
        np.testing.assert_array_equal(vq, prob.v[rows], strict=True)
        np.testing.assert_array_equal(pq, prob.p[rows], strict=True)


@TWO_THREADS
def test_v_the_same_bits_whatever_the_threads():
    x = np.random.default_rng(9).random((1001, 3))
    built = {}
    for threads in (1, 2):
        with thread_counts(threads):
            built[threads] = rg.ResidualProblem(x, kernel=rg.Matern52(0.2), inducing=37)
    np.testing.assert_array_equal(built[1].v, built[2].v, strict=True)
    np.testing.assert_array_equal(built[1].p, built[2].p, strict=True)


# --------------------------------------------------------------------------------------
# kmeans++ and kmeans
# --------------------------------------------------------------------------------------


def test_pairwise_sum_is_numpys():
    rng = np.random.default_rng(1)
    for n in [*range(1, 300), 1000, 8191, 8192, 8193, 65536, 100_003]:
        a = rng.random(n) * np.exp(5 * rng.standard_normal(n))
        assert _pairwise_sum(a, 0, n) == a.sum(), n


@pytest.mark.parametrize("seed", [0, 1, 7, 123])
@pytest.mark.parametrize("shape", [(150, 2, 25), (1000, 1, 50), (600, 8, 40), (300, 9, 60), (3000, 3, 256), (40, 2, 40)])
def test_kmeanspp_makes_the_numpy_versions_choices(seed, shape):
    n, d, m = shape
    rng = np.random.default_rng(seed + 1000)
    x = rng.random((n, d)) * np.exp(3 * rng.standard_normal())
    x[rng.choice(n, n // 10)] = x[rng.choice(n, n // 10)]  # some duplicated points
    np.testing.assert_array_equal(kmeanspp_indices(x, m, seed), kmeanspp_numpy(x, m, seed))


def test_kmeanspp_fewer_distinct_locations_than_centres():
    x = np.repeat(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), 10, axis=0)
    for seed in range(5):
        np.testing.assert_array_equal(kmeanspp_indices(x, 7, seed), kmeanspp_numpy(x, 7, seed))


def test_kmeans_problem_deterministic_and_not_data_points():
    x = np.random.default_rng(10).random((2000, 2))
    kern = rg.Matern32(0.1)
    a = rg.ResidualProblem(x, kernel=kern, inducing=30, seed=4, inducing_method="kmeans")
    b = rg.ResidualProblem(x, kernel=kern, inducing=30, seed=4, inducing_method="kmeans")
    c = rg.ResidualProblem(x, kernel=kern, inducing=30, seed=5, inducing_method="kmeans")
    np.testing.assert_array_equal(a.inducing, b.inducing, strict=True)
    np.testing.assert_array_equal(a.v, b.v, strict=True)
    assert not np.array_equal(a.inducing, c.inducing)
    assert a.inducing_indices is None and a.inducing_method == "kmeans"
    # Lloyd moved the kmeans++ seeds to centroids: none is a data point, so no p ~ jitter
    seeds = x[kmeanspp_indices(x, 30, 4)]
    assert not np.any((a.inducing[:, None, :] == x[None, :, :]).all(axis=2))
    assert np.all(np.linalg.norm(a.inducing - seeds, axis=1) > 0)
    assert np.min(a.p) > 100 * DEFAULT_JITTER * kern.variance
    pp = rg.ResidualProblem(x, kernel=kern, inducing=30, seed=4)
    assert np.min(pp.p) < 2 * DEFAULT_JITTER * kern.variance
    # the centroids are the means of their Voronoi cells (converged or capped, and stable)
    labels = np.argmin(((x[:, None, :] - a.inducing[None, :, :]) ** 2).sum(axis=2), axis=1)
    means = np.array([x[labels == c].mean(axis=0) for c in range(30)])
    np.testing.assert_allclose(a.inducing, means, atol=0.05)


@TWO_THREADS
def test_kmeans_the_same_bits_whatever_the_threads():
    x = np.random.default_rng(11).random((5000, 3))
    out = {}
    for threads in (1, 2):
        with thread_counts(threads):
            out[threads] = kmeans_centres(x, 40, 2)
    np.testing.assert_array_equal(out[1], out[2], strict=True)


def test_kmeans_empty_cluster_takes_the_farthest_point():
    x = np.array([[0.0], [1.0], [2.0], [9.0]])
    centres = np.array([[0.5], [100.0], [200.0]])  # the last two own no point
    labels = np.zeros(4, dtype=np.int64)
    dist = (x[:, 0] - 0.5) ** 2
    _update_centres(x, labels, dist, centres)
    np.testing.assert_array_equal(centres[:, 0], [3.0, 9.0, 2.0])  # the mean; farthest, then next


def test_kmeans_with_fewer_distinct_locations_than_centres():
    x = np.repeat(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), 10, axis=0)
    u = kmeans_centres(x, 5, 0)
    assert u.shape == (5, 2) and np.all(np.isfinite(u))
    np.testing.assert_array_equal(u, kmeans_centres(x, 5, 0), strict=True)
    prob = rg.ResidualProblem(x, kernel=rg.RBF(0.5), inducing=5, inducing_method="kmeans")
    assert np.all(np.isfinite(prob.v)) and np.all(prob.p > 0)
    assert KMEANS_MAX_ITER >= 1


def test_bad_inducing_method():
    with pytest.raises(InvalidArgumentError, match=r"inducing_method=.lloyd."):
        rg.ResidualProblem(np.random.default_rng(0).random((20, 2)), kernel=rg.RBF(0.3), inducing_method="lloyd")


# --------------------------------------------------------------------------------------
# the default inducing count
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 100, 255, 256])
def test_default_inducing_works_for_small_n(n):
    x = np.random.default_rng(n).random((n, 2))
    kern = rg.Matern32(lengthscale=0.1)
    k = min(5, n - 1)
    prob = rg.ResidualProblem(x, kernel=kern)
    assert prob.m == default_inducing(n) == max(1, min(256, n // 2))
    res = rg.ResidualIndex(prob, backend="cpu").query(k)
    assert_matches_reference(prob, res, k)
    idx, dist = rg.residual_knn(x, k=k, kernel=kern)
    np.testing.assert_array_equal(idx, res.indices)
    np.testing.assert_array_equal(dist, res.distances)


def test_default_inducing_rule():
    assert [default_inducing(n) for n in (2, 3, 4, 100, 511, 512, 10**6)] == [1, 1, 2, 50, 255, 256, 256]


def test_explicit_inducing_above_n_still_raises():
    with pytest.raises(InvalidArgumentError, match="inducing=101"):
        rg.residual_knn(np.random.default_rng(0).random((100, 2)), k=5, kernel=rg.Matern32(0.1), inducing=101)


def test_cli_knn_default_inducing(tmp_path):
    path, out = tmp_path / "x.npy", tmp_path / "nn.npz"
    x = np.random.default_rng(3).random((100, 2))
    np.save(path, x)
    result = CliRunner().invoke(main, ["knn", str(path), "-o", str(out), "-k", "5", "--lengthscale", "0.1",
                                       "--kernel", "matern32", "--no-progress", "--backend", "cpu"])
    assert result.exit_code == 0, result.output
    with np.load(out) as data:
        idx, _ = rg.residual_knn(x, k=5, kernel=rg.Matern32(0.1), backend="cpu")
        np.testing.assert_array_equal(data["indices"], idx)


# --------------------------------------------------------------------------------------
# with_kernel
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["kmeans++", "kmeans", "given"])
def test_with_kernel_equals_a_fresh_build(method):
    x = np.random.default_rng(12).random((700, 3))
    first = rg.Matern52(0.2)
    if method == "given":
        base = rg.ResidualProblem(x, kernel=first, inducing=np.random.default_rng(13).random((19, 3)))
    else:
        base = rg.ResidualProblem(x, kernel=first, inducing=19, seed=6, inducing_method=method)
    for kern in (rg.Matern52(0.35, 2.0), rg.RBF([0.1, 0.2, 0.3]), rg.Matern12(0.05, 0.5)):
        new = base.with_kernel(kern)
        fresh = rg.ResidualProblem(x, kernel=kern, inducing=base.inducing)
        assert new.kernel == kern and new.m == 19
        for name in ("v", "p", "v_norms", "chol", "inducing", "coords"):
            np.testing.assert_array_equal(getattr(new, name), getattr(fresh, name), strict=True, err_msg=name)
        assert new.coords is base.coords  # shared, not converted again
        assert new.seed == base.seed and new.inducing_method == base.inducing_method
        if method == "kmeans++":
            np.testing.assert_array_equal(new.inducing_indices, base.inducing_indices)
        res = rg.ResidualIndex(new, backend="cpu").query(4, queries=np.arange(0, 700, 50))
        assert_matches_reference(new, res, 4, queries=np.arange(0, 700, 50))
    np.testing.assert_array_equal(base.v, rg.ResidualProblem(x, kernel=first, inducing=base.inducing).v)


def test_with_kernel_validation():
    x = np.random.default_rng(14).random((50, 2))
    base = rg.ResidualProblem(x, kernel=rg.RBF(0.3), inducing=5)
    with pytest.raises(InvalidArgumentError, match="lengthscale"):
        base.with_kernel(rg.RBF([0.1, 0.2, 0.3]))  # d = 2
    with pytest.raises(InvalidArgumentError, match="lengthscales apart"):
        base.with_kernel(rg.RBF(1e-150))
    with pytest.raises(rg.errors.InvalidTypeError, match="kernel"):
        base.with_kernel(0.3)
    bare = rg.ResidualProblem.from_factors(x, v=base.v, p=base.p, kernel=base.kernel)
    with pytest.raises(InvalidArgumentError, match="inducing"):
        bare.with_kernel(rg.RBF(0.4))
