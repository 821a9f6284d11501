"""ResidualProblem: the low-rank factors V, p against a dense numpy reference, inducing-point
selection, from_factors, factors_at, input handling and validation."""

from __future__ import annotations

import numpy as np
import pytest

import residual_gpu as rg
from residual_gpu.errors import InvalidArgumentError, InvalidTypeError
from residual_gpu.problem import DEFAULT_JITTER, DEFAULT_P_FLOOR

KERNELS = [rg.RBF(0.3, 1.5), rg.Matern12(0.2), rg.Matern32([0.25, 0.5], 0.7), rg.Matern52(0.4, 2.0)]


def dense_reference(x, kernel, u, jitter=DEFAULT_JITTER, p_floor=DEFAULT_P_FLOOR):
    """Q = K(X,U) (K(U,U) + j s2 I)^-1 K(U,X), the Cholesky-based V, and p, from numpy only."""
    s2 = kernel.variance
    kuu = kernel(u) + jitter * s2 * np.eye(u.shape[0])
    kxu = kernel(x, u)
    q = kxu @ np.linalg.solve(kuu, kxu.T)
    chol = np.linalg.cholesky(kuu)
    v = np.linalg.solve(chol, kxu.T).T
    p = np.maximum(s2 - np.einsum("ij,ij->i", v, v), p_floor * s2)
    return q, v, p


def assert_gram_close(v, q, rtol=1e-10):
    np.testing.assert_allclose(v @ v.T, q, rtol=0, atol=rtol * np.abs(q).max())


@pytest.fixture(scope="module")
def coords():
    return np.random.default_rng(3).random((150, 2))


# --------------------------------------------------------------------------------------
# V and p against the dense reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS, ids=repr)
@pytest.mark.parametrize("m", [1, 7, 30])
def test_factors_match_dense_reference_kmeans_inducing(coords, kernel, m):
    prob = rg.ResidualProblem(coords, kernel=kernel, inducing=m, seed=5)
    assert prob.n == 150 and prob.d == 2 and prob.m == m
    assert prob.v.shape == (150, m) and prob.p.shape == (150,)
    assert prob.v.dtype == np.float64 and prob.p.dtype == np.float64
    assert prob.v.flags.c_contiguous
    u = coords[prob.inducing_indices]
    np.testing.assert_array_equal(prob.inducing, u)
    q, v_ref, p_ref = dense_reference(coords, kernel, u)
    assert_gram_close(prob.v, q)
    # the Cholesky factor is unique, so V itself is determined
    np.testing.assert_allclose(prob.v, v_ref, rtol=0, atol=1e-9 * np.abs(v_ref).max())
    np.testing.assert_allclose(prob.p, p_ref, rtol=1e-6, atol=1e-12 * kernel.variance)
    assert np.all(prob.p >= DEFAULT_P_FLOOR * kernel.variance)
    assert np.all(prob.p <= kernel.variance * (1 + 1e-12))
    np.testing.assert_allclose(prob.v_norms, np.linalg.norm(prob.v, axis=1), rtol=1e-14)


@pytest.mark.parametrize("kernel", KERNELS, ids=repr)
def test_factors_match_dense_reference_given_inducing(coords, kernel):
    u = np.random.default_rng(4).random((12, 2))
    prob = rg.ResidualProblem(coords, kernel=kernel, inducing=u)
    assert prob.inducing_indices is None
    np.testing.assert_array_equal(prob.inducing, u)
    q, _v_ref, p_ref = dense_reference(coords, kernel, u)
    assert_gram_close(prob.v, q)
    np.testing.assert_allclose(prob.p, p_ref, rtol=1e-9, atol=1e-12)
    # p is the residual variance: variance - diag(Q)
    np.testing.assert_allclose(prob.p, np.maximum(kernel.variance - np.diag(q), 1e-12 * kernel.variance),
                               rtol=1e-8, atol=1e-10)


def test_jitter_is_relative_to_variance(coords):
    u = coords[:40]  # inducing = data points: p is about the jitter there
    kern = rg.RBF(0.5, variance=4.0)
    prob = rg.ResidualProblem(coords, kernel=kern, inducing=u, jitter=1e-4)
    q, _, p_ref = dense_reference(coords, kern, u, jitter=1e-4)
    assert_gram_close(prob.v, q)
    np.testing.assert_allclose(prob.p, p_ref, rtol=1e-7)
    assert prob.jitter == 1e-4
    # at an inducing point, p ~ jitter * variance (not jitter alone)
    assert prob.p[:40].max() < 2e-4 * 4.0 and prob.p[:40].min() > 1e-5 * 4.0


def test_p_floor_applies(coords):
    u = coords[:60]
    kern = rg.Matern52(0.8, variance=2.0)
    prob = rg.ResidualProblem(coords, kernel=kern, inducing=u, p_floor=1e-3)
    _, _, p_ref = dense_reference(coords, kern, u, p_floor=1e-3)
    floor = 1e-3 * 2.0
    assert np.any(prob.p == floor), "test problem should hit the floor somewhere"
    assert np.all(prob.p >= floor)
    np.testing.assert_allclose(prob.p, p_ref, rtol=1e-7)
    raw = 2.0 - np.einsum("ij,ij->i", prob.v, prob.v)
    np.testing.assert_array_equal(prob.p == floor, raw <= floor)


@pytest.mark.parametrize("jitter,p_floor,name", [(-1e-6, 1e-12, "jitter"), (np.nan, 1e-12, "jitter"),
                                                 (1e-6, 0.0, "p_floor"), (1e-6, np.inf, "p_floor")])
def test_bad_jitter_and_floor(coords, jitter, p_floor, name):
    with pytest.raises(InvalidArgumentError, match=name):
        rg.ResidualProblem(coords, kernel=rg.RBF(0.3), inducing=5, jitter=jitter, p_floor=p_floor)


def test_singular_inducing_gram_without_jitter(coords):
    u = np.concatenate([coords[:5], coords[:1]])  # a repeated inducing point: K(U, U) is singular
    with pytest.raises(InvalidArgumentError, match="positive definite.*jitter"):
        rg.ResidualProblem(coords, kernel=rg.RBF(0.3), inducing=u, jitter=0.0)
    prob = rg.ResidualProblem(coords, kernel=rg.RBF(0.3), inducing=u)  # the default jitter copes
    assert np.all(np.isfinite(prob.v)) and np.all(prob.p > 0)


# --------------------------------------------------------------------------------------
# Inducing points
# --------------------------------------------------------------------------------------


def test_kmeans_inducing_deterministic_distinct_and_seed_dependent(coords):
    kern = rg.Matern32(0.3)
    a = rg.ResidualProblem(coords, kernel=kern, inducing=25, seed=11)
    b = rg.ResidualProblem(coords, kernel=kern, inducing=25, seed=11)
    c = rg.ResidualProblem(coords, kernel=kern, inducing=25, seed=12)
    np.testing.assert_array_equal(a.inducing_indices, b.inducing_indices)
    np.testing.assert_array_equal(a.v, b.v)
    np.testing.assert_array_equal(a.p, b.p)
    idx = a.inducing_indices
    assert idx.shape == (25,) and np.issubdtype(idx.dtype, np.integer)
    assert len(set(idx.tolist())) == 25
    assert idx.min() >= 0 and idx.max() < 150
    assert a.seed == 11
    assert not np.array_equal(np.sort(a.inducing_indices), np.sort(c.inducing_indices))
    np.testing.assert_array_equal(a.inducing, coords[idx])


def test_kmeans_inducing_all_points(coords):
    prob = rg.ResidualProblem(coords[:40], kernel=rg.RBF(0.2), inducing=40)
    assert sorted(prob.inducing_indices.tolist()) == list(range(40))


def test_inducing_array_used_as_given(coords):
    u = np.array([[0.1, 0.2], [0.5, 0.5], [0.9, 0.3], [5.0, 5.0]])  # one far from the data on purpose
    u_copy = u.copy()
    prob = rg.ResidualProblem(coords, kernel=rg.RBF(0.3), inducing=u)
    np.testing.assert_array_equal(prob.inducing, u)
    np.testing.assert_array_equal(u, u_copy)
    assert prob.m == 4
    # the far inducing point explains nothing: its column of V is ~0
    assert np.abs(prob.v[:, 3]).max() < 1e-20


def test_duplicated_data_points(coords):
    x = np.concatenate([coords[:50], coords[:50], coords[:10]])
    kern = rg.Matern52(0.3)
    prob = rg.ResidualProblem(x, kernel=kern, inducing=30, seed=2)
    assert len(set(prob.inducing_indices.tolist())) == 30
    assert np.all(np.isfinite(prob.v)) and np.all(prob.p > 0)
    np.testing.assert_allclose(prob.v[:50], prob.v[50:100], rtol=0, atol=1e-12)
    np.testing.assert_allclose(prob.p[:50], prob.p[50:100], rtol=1e-8)
    q, _, _ = dense_reference(x, kern, prob.inducing)
    assert_gram_close(prob.v, q)
    # a point and its copy are at residual distance 0 and find each other
    _idx, dist = rg.ResidualIndex(prob).query(1, queries=np.arange(10))
    np.testing.assert_allclose(dist[:, 0], 0.0, atol=1e-6)


def test_fewer_distinct_locations_than_inducing_points():
    x = np.repeat(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), 10, axis=0)
    prob = rg.ResidualProblem(x, kernel=rg.RBF(0.5), inducing=5, seed=0)
    assert len(set(prob.inducing_indices.tolist())) == 5
    assert np.all(np.isfinite(prob.v)) and np.all(prob.p > 0)


@pytest.mark.parametrize("m", [0, -1, 151])
def test_inducing_count_out_of_range(coords, m):
    with pytest.raises(InvalidArgumentError) as info:
        rg.ResidualProblem(coords, kernel=rg.RBF(0.3), inducing=m)
    assert f"inducing={m}" in str(info.value)


def test_inducing_array_wrong_width_or_non_finite(coords):
    with pytest.raises(InvalidArgumentError, match="inducing"):
        rg.ResidualProblem(coords, kernel=rg.RBF(0.3), inducing=np.zeros((4, 3)))
    with pytest.raises(InvalidArgumentError, match="inducing"):
        rg.ResidualProblem(coords, kernel=rg.RBF(0.3), inducing=np.array([[0.1, np.inf]]))
    with pytest.raises(InvalidTypeError, match="inducing"):
        rg.ResidualProblem(coords, kernel=rg.RBF(0.3), inducing="ten")


def test_bad_seed(coords):
    with pytest.raises(InvalidArgumentError, match="seed"):
        rg.ResidualProblem(coords, kernel=rg.RBF(0.3), inducing=5, seed=-1)
    with pytest.raises(InvalidTypeError, match="seed"):
        rg.ResidualProblem(coords, kernel=rg.RBF(0.3), inducing=5, seed=1.5)


# --------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------


def test_inputs_not_modified(coords):
    x = coords.copy()
    u = coords[::10].copy() + 0.01
    x0, u0 = x.copy(), u.copy()
    prob = rg.ResidualProblem(x, kernel=rg.RBF(0.3), inducing=u)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(u, u0)
    assert x.flags.writeable and u.flags.writeable
    # the problem holds copies: writing to the caller's arrays does not reach it
    x[0, 0] = 123.0
    u[0, 0] = 123.0
    assert prob.coords[0, 0] == x0[0, 0]
    assert prob.inducing[0, 0] == u0[0, 0]
    # and its own arrays are read-only
    for arr in (prob.coords, prob.v, prob.p, prob.inducing, prob.v_norms):
        assert not arr.flags.writeable


def test_from_factors_inputs_not_modified(coords):
    ref = rg.ResidualProblem(coords, kernel=rg.RBF(0.3), inducing=10)
    x, v, p, u = coords.copy(), np.array(ref.v), np.array(ref.p), np.array(ref.inducing)
    copies = [a.copy() for a in (x, v, p, u)]
    prob = rg.ResidualProblem.from_factors(x, v=v, p=p, kernel=rg.RBF(0.3), inducing=u)
    for a, c in zip((x, v, p, u), copies):
        np.testing.assert_array_equal(a, c)
        assert a.flags.writeable
    v[0, 0] += 1.0
    p[0] += 1.0
    assert prob.v[0, 0] == copies[1][0, 0]
    assert prob.p[0] == copies[2][0]


@pytest.mark.parametrize("variant", ["float32", "int", "fortran", "strided", "list", "int32"])
def test_coordinate_layouts_and_dtypes_accepted(variant):
    rng = np.random.default_rng(6)
    if variant in ("int", "int32"):
        base = rng.integers(0, 20, size=(80, 2)).astype(np.int64 if variant == "int" else np.int32)
        same = base.astype(np.float64)
        given = base
    elif variant == "float32":
        given = rng.random((80, 2)).astype(np.float32)
        same = given.astype(np.float64)
    elif variant == "fortran":
        same = rng.random((80, 2))
        given = np.asfortranarray(same)
        assert not given.flags.c_contiguous
    elif variant == "strided":
        big = rng.random((160, 4))
        given = big[::2, 1::2]
        assert not given.flags.c_contiguous
        same = np.ascontiguousarray(given)
    else:
        same = rng.random((80, 2))
        given = same.tolist()
    kern = rg.Matern32(3.0 if variant in ("int", "int32") else 0.3)
    u = same[:9] + 0.25
    a = rg.ResidualProblem(given, kernel=kern, inducing=u)
    b = rg.ResidualProblem(same, kernel=kern, inducing=u)
    assert a.coords.dtype == np.float64 and a.coords.flags.c_contiguous
    np.testing.assert_array_equal(a.coords, same)
    np.testing.assert_array_equal(a.v, b.v)
    np.testing.assert_array_equal(a.p, b.p)
    # kmeans++ selection too
    c = rg.ResidualProblem(given, kernel=kern, inducing=9, seed=3)
    d = rg.ResidualProblem(same, kernel=kern, inducing=9, seed=3)
    np.testing.assert_array_equal(c.inducing_indices, d.inducing_indices)
    np.testing.assert_array_equal(c.v, d.v)


def test_one_dimensional_coords_are_a_column():
    x = np.linspace(0, 1, 30)
    a = rg.ResidualProblem(x, kernel=rg.RBF(0.2), inducing=5, seed=1)
    b = rg.ResidualProblem(x[:, None], kernel=rg.RBF(0.2), inducing=5, seed=1)
    assert a.d == 1
    np.testing.assert_array_equal(a.v, b.v)


@pytest.mark.parametrize("bad,cls", [
    (np.array([[0.0, 1.0], [np.nan, 0.5]]), InvalidArgumentError),
    (np.array([[0.0, 1.0], [np.inf, 0.5]]), InvalidArgumentError),
    (np.zeros((3, 2, 2)), InvalidArgumentError),
    (np.zeros((0, 2)), InvalidArgumentError),
    (np.zeros((4, 0)), InvalidArgumentError),
    (np.array([["a", "b"]]), InvalidTypeError),
    (np.array([[True, False]]), InvalidTypeError),
    (np.array([[1 + 2j, 0]]), InvalidTypeError),
    ("coords.npy", InvalidTypeError),
    (None, InvalidTypeError),
])
def test_bad_coords(bad, cls):
    with pytest.raises(cls) as info:
        rg.ResidualProblem(bad, kernel=rg.RBF(0.3), inducing=1)
    assert "coords" in str(info.value)
    assert isinstance(info.value, ValueError if cls is InvalidArgumentError else TypeError)


def test_non_finite_coords_message_points_at_the_entry():
    x = np.zeros((5, 2))
    x[3, 1] = np.nan
    with pytest.raises(InvalidArgumentError, match=r"coords\[3, 1\]=.*nan"):
        rg.ResidualProblem(x, kernel=rg.RBF(0.3), inducing=1)


def test_kernel_must_be_a_kernel(coords):
    with pytest.raises(InvalidTypeError, match="kernel"):
        rg.ResidualProblem(coords, kernel=lambda a, b: a @ b.T, inducing=3)
    prob = rg.ResidualProblem(coords, kernel="matern52", inducing=3)  # names are accepted
    assert prob.kernel == rg.Matern52(1.0, 1.0)


# --------------------------------------------------------------------------------------
# factors_at
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS, ids=repr)
def test_factors_at_dataset_coordinates_reproduces_v_and_p(coords, kernel):
    prob = rg.ResidualProblem(coords, kernel=kernel, inducing=20, seed=1)
    xq, vq, pq = prob.factors_at(coords[10:40])
    np.testing.assert_array_equal(xq, coords[10:40])
    np.testing.assert_allclose(vq, prob.v[10:40], rtol=0, atol=1e-13 * max(1.0, np.abs(prob.v).max()))
    np.testing.assert_allclose(pq, prob.p[10:40], rtol=1e-7, atol=1e-14)


def test_factors_at_new_points_match_dense_reference(coords):
    kern = rg.Matern32(0.25)
    prob = rg.ResidualProblem(coords, kernel=kern, inducing=15, seed=0)
    xnew = np.random.default_rng(12).random((9, 2))
    _xq, vq, pq = prob.factors_at(xnew)
    q, _v_ref, p_ref = dense_reference(xnew, kern, prob.inducing)
    assert_gram_close(vq, q)
    np.testing.assert_allclose(pq, p_ref, rtol=1e-8)
    # cross products with dataset points: k(x*, U) (K_UU + jI)^-1 k(U, x_j)
    kuu = kern(prob.inducing) + DEFAULT_JITTER * np.eye(15)
    cross = kern(xnew, prob.inducing) @ np.linalg.solve(kuu, kern(prob.inducing, coords))
    np.testing.assert_allclose(vq @ prob.v.T, cross, rtol=0, atol=1e-10 * np.abs(cross).max())


def test_factors_at_validation(coords):
    prob = rg.ResidualProblem(coords, kernel=rg.RBF(0.3), inducing=5)
    with pytest.raises(InvalidArgumentError, match="query_coords"):
        prob.factors_at(np.zeros((3, 3)))
    with pytest.raises(InvalidArgumentError, match="query_coords"):
        prob.factors_at(np.array([[0.0, np.nan]]))


# --------------------------------------------------------------------------------------
# from_factors
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(coords):
    return rg.ResidualProblem(coords, kernel=rg.Matern52(0.3), inducing=12, seed=4)


def test_from_factors_roundtrip(coords, built):
    prob = rg.ResidualProblem.from_factors(coords, v=built.v, p=built.p, kernel=built.kernel,
                                           inducing=built.inducing)
    np.testing.assert_array_equal(prob.v, built.v)
    np.testing.assert_array_equal(prob.p, built.p)
    assert prob.m == 12 and prob.n == 150
    assert prob.seed is None and prob.inducing_indices is None
    _xq, vq, _pq = prob.factors_at(coords[:5])
    np.testing.assert_allclose(vq, built.v[:5], rtol=0, atol=1e-13)
    # same neighbours as the original problem
    a = rg.ResidualIndex(prob).query(4)
    b = rg.ResidualIndex(built).query(4)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.distances, b.distances)


def test_from_factors_p_used_as_given(coords, built):
    p = np.full(150, 1e-14)  # below the floor: used anyway
    prob = rg.ResidualProblem.from_factors(coords, v=built.v, p=p, kernel=built.kernel)
    np.testing.assert_array_equal(prob.p, p)


def test_from_factors_without_inducing_cannot_query_new_points(coords, built):
    prob = rg.ResidualProblem.from_factors(coords, v=built.v, p=built.p, kernel=built.kernel)
    assert prob.inducing is None
    with pytest.raises(InvalidArgumentError, match="inducing"):
        prob.factors_at(coords[:3])
    with pytest.raises(InvalidArgumentError, match="inducing"):
        rg.ResidualIndex(prob).query(3, query_coords=coords[:3])
    # dataset queries still work
    assert rg.ResidualIndex(prob).query(3).indices.shape == (150, 3)


@pytest.mark.parametrize("case,name", [
    ("v_rows", "v"), ("v_nan", "v"), ("v_inf", "v"), ("v_3d", "v"),
    ("p_len", "p"), ("p_zero", "p"), ("p_negative", "p"), ("p_nan", "p"), ("p_2d", "p"),
])
def test_from_factors_bad_factors(coords, built, case, name):
    v = np.array(built.v)
    p = np.array(built.p)
    if case == "v_rows":
        v = v[:-1]
    elif case == "v_nan":
        v[7, 2] = np.nan
    elif case == "v_inf":
        v[0, 0] = -np.inf
    elif case == "v_3d":
        v = v[:, :, None]
    elif case == "p_len":
        p = p[:-3]
    elif case == "p_zero":
        p[4] = 0.0
    elif case == "p_negative":
        p[4] = -1e-3
    elif case == "p_nan":
        p[4] = np.nan
    elif case == "p_2d":
        p = p[:, None]
    with pytest.raises(InvalidArgumentError) as info:
        rg.ResidualProblem.from_factors(coords, v=v, p=p, kernel=built.kernel)
    msg = str(info.value)
    assert msg.startswith(f"{name} "), msg


def test_from_factors_bad_types(coords, built):
    with pytest.raises(InvalidTypeError, match="^v "):
        rg.ResidualProblem.from_factors(coords, v="V", p=built.p, kernel=built.kernel)
    with pytest.raises(InvalidTypeError, match="^p "):
        rg.ResidualProblem.from_factors(coords, v=built.v, p=np.array(["a"] * 150), kernel=built.kernel)


def test_from_factors_inducing_must_match_v_columns(coords, built):
    with pytest.raises(InvalidArgumentError, match=r"inducing.*m=12") as info:
        rg.ResidualProblem.from_factors(coords, v=built.v, p=built.p, kernel=built.kernel,
                                        inducing=built.inducing[:11])
    assert "(11, 2)" in str(info.value)
    with pytest.raises(InvalidArgumentError, match="inducing"):
        rg.ResidualProblem.from_factors(coords, v=built.v, p=built.p, kernel=built.kernel,
                                        inducing=np.zeros((12, 3)))


def test_from_factors_bad_coords(built):
    with pytest.raises(InvalidArgumentError, match="coords"):
        rg.ResidualProblem.from_factors(np.full((150, 2), np.nan), v=built.v, p=built.p, kernel=built.kernel)
