"""Property tests (hypothesis) of the residual distance: the float64 reference
(residual_gpu.reference) and the cpu backend's dense tile.

Problems are small and random: n in 5..40 points in [0, 1]^d, d in 1..4, every kernel
family, scalar or ARD lengthscales in 0.05..2, kmeans++ or given inducing points.

Two kinds of comparison between the tile and the reference:
- on problems built by ResidualProblem (inducing points at data points, so p can be as
  small as ~jitter * variance there), the fast tile's |rho| must lie within the rounding
  margin E_i that certification relies on (residual_gpu.precision.query_margins);
- on well-conditioned problems (factors from ResidualProblem.from_factors with V shrunk
  by 0.9 and p = 0.999 times the resulting residual variance, so p >= 0.19 variance and a
  point sits at distance exactly 0 from itself in both), the distances agree within the same
  margins turned into distance (precision.distance_tolerance).
"""

from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import residual_gpu as rg
from residual_gpu.index import ResidualIndex
from residual_gpu.precision import accurate_rho_error, distance_tolerance, query_margins
from residual_gpu.reference import residual_distance_reference, residual_rho_block

SETTINGS = settings(deadline=None, max_examples=30, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
KERNEL_CLASSES = [rg.RBF, rg.Matern12, rg.Matern32, rg.Matern52]


@st.composite
def problems(draw):
    n = draw(st.integers(5, 40))
    d = draw(st.integers(1, 4))
    cls = draw(st.sampled_from(KERNEL_CLASSES))
    ls_value = st.floats(0.05, 2.0, allow_nan=False, allow_infinity=False)
    lengthscale = draw(st.one_of(ls_value, st.lists(ls_value, min_size=d, max_size=d)))
    variance = draw(st.floats(0.1, 10.0))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.random((n, d))
    n_dup = draw(st.integers(0, 2))  # occasionally copy a point onto another
    for _ in range(n_dup):
        a, b = rng.integers(n, size=2)
        x[a] = x[b]
    kernel = cls(lengthscale=lengthscale, variance=variance)
    if draw(st.booleans()):
        inducing = draw(st.integers(1, n))
    else:
        inducing = rng.random((draw(st.integers(1, 12)), d))
    return rg.ResidualProblem(x, kernel=kernel, inducing=inducing, seed=int(seed % 1000))


def well_conditioned(prob: rg.ResidualProblem) -> rg.ResidualProblem:
    v = 0.9 * prob.v
    p = 0.999 * (prob.kernel.variance - np.einsum("ij,ij->i", v, v))
    return rg.ResidualProblem.from_factors(prob.coords, v=v, p=p, kernel=prob.kernel, inducing=prob.inducing)


def reference(prob, rows=None, cols=None):
    rows = np.arange(prob.n) if rows is None else rows
    cols = np.arange(prob.n) if cols is None else cols
    return residual_distance_reference(prob.coords, prob.v, prob.p, prob.kernel, rows, cols)


def margins(prob, rows=None):
    """Certification margin E_i of each query row: bounds |fast - exact| + |accurate - exact|."""
    rows = np.arange(prob.n) if rows is None else np.asarray(rows)
    ip = 1.0 / np.sqrt(prob.p)
    return query_margins(prob.v_norms[rows], prob.p[rows], float(np.max(prob.v_norms * ip)), float(np.max(ip)),
                         prob.m, prob.d, prob.kernel.variance)


def reference_error(prob, rows=None, cols=None):
    """Bound on the reference's own |rho| error per pair (precision.accurate_rho_error)."""
    rows = np.arange(prob.n) if rows is None else np.asarray(rows)
    cols = np.arange(prob.n) if cols is None else np.asarray(cols)
    return accurate_rho_error(prob.v_norms[rows], prob.v_norms[cols], prob.p[rows], prob.p[cols], prob.m, prob.d,
                              prob.kernel.variance)


def tile_abs_rho(prob, rows=None, cols=None):
    rows = np.arange(prob.n) if rows is None else np.asarray(rows, dtype=np.int64)
    cols = np.arange(prob.n) if cols is None else np.asarray(cols, dtype=np.int64)
    index = ResidualIndex(prob, backend="cpu")
    batch = ResidualIndex._batch(index, rows, None, False)
    return index._backend.abs_rho_tile(index._prepared, batch, cols)


# --------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------


@SETTINGS
@given(problems())
def test_reference_symmetric_zero_diagonal_and_bounded(prob):
    dist = reference(prob)
    assert dist.shape == (prob.n, prob.n)
    assert np.all(np.isfinite(dist))
    assert np.all((dist >= 0.0) & (dist <= 1.0))
    np.testing.assert_array_equal(np.diag(dist), 0.0)
    np.testing.assert_allclose(dist, dist.T, rtol=0, atol=1e-15)


@SETTINGS
@given(problems(), st.data())
def test_reference_blocks_are_consistent(prob, data):
    """A sub-block computed on its own equals the same entries of the full matrix."""
    full = reference(prob)
    rows = np.array(data.draw(st.lists(st.integers(0, prob.n - 1), min_size=1, max_size=8)))
    cols = np.array(data.draw(st.lists(st.integers(0, prob.n - 1), min_size=1, max_size=8)))
    np.testing.assert_array_equal(reference(prob, rows, cols), full[np.ix_(rows, cols)])


@SETTINGS
@given(problems())
def test_reference_equals_textbook_formula(prob):
    """d = sqrt(1 - min(|k - V V^T| / sqrt(p p^T), 1)), off the diagonal, where that formula is well
    conditioned (plain float64 products; the reference uses a compensated dot product)."""
    dist = reference(prob)
    kmat = prob.kernel(prob.coords)
    vv = prob.v @ prob.v.T
    rho = (kmat - vv) / np.sqrt(np.outer(prob.p, prob.p))
    expected = np.sqrt(1.0 - np.minimum(np.abs(rho), 1.0))
    # rounding of the plain product, relative to sqrt(p_i p_j), and its effect on d = sqrt(1 - a)
    err_a = 1e-13 * (prob.kernel.variance + np.outer(prob.v_norms, prob.v_norms)) / np.sqrt(np.outer(prob.p, prob.p))
    ok = (err_a < 1e-6) & (expected > 1e-3) & ~np.eye(prob.n, dtype=bool)
    np.testing.assert_allclose(dist[ok], expected[ok], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------
# The cpu backend's dense tile
# --------------------------------------------------------------------------------------


@SETTINGS
@given(problems())
def test_tile_within_certified_margin_of_reference(prob):
    a_fast = tile_abs_rho(prob)
    assert a_fast.shape == (prob.n, prob.n)
    assert np.all((a_fast >= 0.0) & (a_fast <= 1.0))
    d_fast = np.sqrt(1.0 - a_fast)
    assert np.all((d_fast >= 0.0) & (d_fast <= 1.0))
    a_ref = np.abs(residual_rho_block(prob.coords, prob.v, prob.p, prob.coords, prob.v, prob.p, prob.kernel))
    ip = 1.0 / np.sqrt(prob.p)
    w_max, ip_max = float(np.max(prob.v_norms * ip)), float(np.max(ip))  # maxima over the candidates
    margin = query_margins(prob.v_norms, prob.p, w_max, ip_max, prob.m, prob.d, prob.kernel.variance)
    excess = np.abs(a_fast - a_ref) - margin[:, None]
    assert excess.max() <= 0.0, f"fast |rho| off by more than the margin: {excess.max():.3g}"
    # the fast tile is symmetric to within the margins of both rows
    np.testing.assert_array_less(np.abs(a_fast - a_fast.T), margin[:, None] + margin[None, :] + 1e-300)


@SETTINGS
@given(problems())
def test_tile_matches_reference_on_well_conditioned_factors(prob):
    prob = well_conditioned(prob)
    assert prob.p.min() >= 0.18 * prob.kernel.variance
    a_fast = tile_abs_rho(prob)
    d_fast = np.sqrt(1.0 - a_fast)
    d_ref = reference(prob)
    np.testing.assert_array_equal(np.diag(d_fast), 0.0)
    e = margins(prob)
    assert np.all(np.abs(d_fast - d_ref) <= distance_tolerance(d_ref, e[:, None] + reference_error(prob)))
    assert np.all(np.abs(d_fast - d_fast.T) <= distance_tolerance(d_fast, e[:, None] + e[None, :]))
    assert np.all((d_fast >= 0.0) & (d_fast <= 1.0))


@SETTINGS
@given(problems(), st.data())
def test_tile_subsets_and_order(prob, data):
    """Any rows and any columns (repeats, any order) give the matching entries of the full tile."""
    prob = well_conditioned(prob)
    full = np.sqrt(1.0 - tile_abs_rho(prob))
    rows = np.array(data.draw(st.lists(st.integers(0, prob.n - 1), min_size=1, max_size=10)))
    cols = np.array(data.draw(st.lists(st.integers(0, prob.n - 1), min_size=1, max_size=10)))
    part = np.sqrt(1.0 - tile_abs_rho(prob, rows, cols))
    assert part.shape == (rows.size, cols.size)
    # another tile shape may round the GEMM differently: both within the row's margin of exact
    e = margins(prob, rows)[:, None]
    assert np.all(np.abs(part - full[np.ix_(rows, cols)]) <= distance_tolerance(full[np.ix_(rows, cols)], 2.0 * e))
    ref = reference(prob, rows, cols)
    assert np.all(np.abs(part - ref) <= distance_tolerance(ref, e + reference_error(prob, rows, cols)))


@SETTINGS
@given(problems())
def test_knn_distances_are_reference_distances(prob):
    """End to end: the returned neighbours carry the reference distances, sorted, ties to the smaller index."""
    k = min(3, prob.n - 1)
    res = ResidualIndex(prob, backend="cpu").query(k)
    dist = reference(prob)
    rows = np.arange(prob.n)[:, None]
    tol = distance_tolerance(dist, 2.0 * reference_error(prob))  # the engine's and the reference's
    assert np.all(np.abs(res.distances - dist[rows, res.indices]) <= tol[rows, res.indices])
    assert np.all(res.indices != rows)
    assert np.all(np.diff(res.distances, axis=1) >= 0)
    # nothing outside the result is closer than the k-th neighbour by more than both tolerances
    masked = np.where(np.eye(prob.n, dtype=bool), np.inf, dist)
    kth = res.distances[:, -1]
    kth_tol = tol[rows[:, 0], res.indices[:, -1]]
    assert np.all(np.sum(masked + tol < kth[:, None] - kth_tol[:, None], axis=1) <= k - 1)
