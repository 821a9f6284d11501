"""The Rust reference oracle (rust_ref/, module residual_gpu_ref) against plain numpy.

The numpy implementation here is deliberately independent and straightforward: a full
distance matrix from the formula (plain float64 products, no compensated summation),
then a per-row np.lexsort by (distance, index).

Test problems are well conditioned on purpose: V is a Nystrom factor shrunk by 0.9, so the
residual variance is at least 19% of the kernel variance, and p is 0.999 times the true
residual variance, so that a point and its exact copies have rho >= 1 in both
implementations, clamp to 1 and sit at distance exactly 0. Agreement is then checked as
1 - |rho| = d^2 to 1e-13 everywhere, and d itself to 1e-12 wherever d >= 0.01 (d = sqrt(1 -
|rho|) amplifies a 1-ulp difference in k, e.g. between numpy's and libm's exp, by 1/(2d)).
"""

from __future__ import annotations

import numpy as np
import pytest

ref = pytest.importorskip(
    "residual_gpu_ref",
    reason="Rust oracle not installed (build it with: pip install ./rust_ref)",
)

KERNELS = ("rbf", "matern12", "matern32", "matern52")
S2 = 1.3
ATOL = 1e-12  # on d where d >= 0.01
ATOL_SQ = 1e-13  # on d^2 = 1 - |rho|, everywhere


# --------------------------------------------------------------------------------------
# Independent numpy reference
# --------------------------------------------------------------------------------------


def np_kernel(r2: np.ndarray, kernel: str, s2: float) -> np.ndarray:
    r = np.sqrt(r2)
    if kernel == "rbf":
        return s2 * np.exp(-r2 / 2.0)
    if kernel == "matern12":
        return s2 * np.exp(-r)
    if kernel == "matern32":
        return s2 * (1.0 + np.sqrt(3.0) * r) * np.exp(-np.sqrt(3.0) * r)
    if kernel == "matern52":
        return s2 * (1.0 + np.sqrt(5.0) * r + 5.0 / 3.0 * r2) * np.exp(-np.sqrt(5.0) * r)
    raise AssertionError(kernel)


def np_cov(x1, x2, kernel, ls, s2):
    """K(x1, x2), elementwise per pair (identical inputs give identical outputs)."""
    diff = (x1[:, None, :] - x2[None, :, :]) / np.asarray(ls, dtype=np.float64)
    return np_kernel(np.sum(diff * diff, axis=-1), kernel, s2)


def np_distances(coords, v, p, kernel, ls, s2):
    """Full (n, n) residual distance matrix, d_ii = 0."""
    k = np_cov(coords, coords, kernel, ls, s2)
    s = np.sum(v[:, None, :] * v[None, :, :], axis=-1)  # elementwise, not BLAS
    rho = np.clip((k - s) / np.sqrt(p[:, None] * p[None, :]), -1.0, 1.0)
    d = np.sqrt(1.0 - np.abs(rho))
    np.fill_diagonal(d, 0.0)
    return d


def np_brute_knn(dist, k, queries=None, predecessor=False):
    n = dist.shape[0]
    queries = np.arange(n) if queries is None else np.asarray(queries)
    idx = np.full((len(queries), k), -1, dtype=np.int64)
    out = np.full((len(queries), k), np.inf)
    for a, i in enumerate(queries):
        cand = np.arange(i) if predecessor else np.delete(np.arange(n), i)
        order = cand[np.lexsort((cand, dist[i, cand]))][:k]
        idx[a, : order.size] = order
        out[a, : order.size] = dist[i, order]
    return idx, out


def make_problem(seed, n, d, m, kernel, duplicate_of=None):
    """coords (n, d), V (n, m), p (n,), lengthscale (d,) from a shrunk Nystrom factor.

    duplicate_of: (copy, original) row pairs; the copy gets the original's x, V and p.
    """
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, d))
    if duplicate_of is not None:
        for c, o in duplicate_of:
            x[c] = x[o]
    ls = rng.uniform(0.2, 0.5, size=d) * np.sqrt(d)
    u = rng.uniform(size=(m, d))
    kuu = np_cov(u, u, kernel, ls, S2) + 1e-6 * S2 * np.eye(m)
    chol = np.linalg.cholesky(kuu)
    v = 0.9 * np.linalg.solve(chol, np_cov(u, x, kernel, ls, S2)).T
    if duplicate_of is not None:
        for c, o in duplicate_of:
            v[c] = v[o]
    v = np.ascontiguousarray(v)
    p = 0.999 * (S2 - np.sum(v * v, axis=1))
    if duplicate_of is not None:
        for c, o in duplicate_of:
            p[c] = p[o]
    assert p.min() > 0.1 * S2
    return x, v, p, ls


def assert_dist_close(got, want):
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    fin = np.isfinite(want)
    g, w = got[fin], want[fin]
    np.testing.assert_allclose(g * g, w * w, rtol=0, atol=ATOL_SQ)
    big = w >= 0.01
    np.testing.assert_allclose(g[big], w[big], rtol=0, atol=ATOL)
    assert np.all((g >= 0.0) & (g <= 1.0))


def call_knn(x, v, p, kernel, ls, k, queries=None, predecessor=False):
    return ref.brute_knn(
        x,
        v,
        p,
        kernel=kernel,
        lengthscale=ls,
        variance=S2,
        k=k,
        queries=queries,
        predecessor=predecessor,
    )


def assert_knn_equal(got, want):
    gi, gd = got
    wi, wd = want
    assert gi.dtype == np.int64 and gd.dtype == np.float64
    assert gi.shape == wi.shape and gd.shape == wd.shape
    np.testing.assert_array_equal(gi, wi)
    assert_dist_close(gd, wd)
    # padding is exactly (-1, inf) in the same places
    np.testing.assert_array_equal(np.isinf(gd), wi < 0)


# --------------------------------------------------------------------------------------
# brute_knn
# --------------------------------------------------------------------------------------


def test_version():
    from importlib.metadata import version

    assert ref.__version__ == version("residual-gpu-ref")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("d", [1, 2, 3, 8])
def test_brute_knn_matches_numpy(kernel, d):
    seed = 1000 + 10 * d + KERNELS.index(kernel)
    n, m = 120, 12
    x, v, p, ls = make_problem(seed, n, d, m, kernel)
    dist = np_distances(x, v, p, kernel, ls, S2)
    # not degenerate: plenty of distances strictly inside (0, 1)
    assert np.mean((dist > 0.01) & (dist < 0.99)) > 0.2
    rng = np.random.default_rng(seed)
    queries = rng.integers(0, n, size=40)
    queries[:3] = [0, n - 1, 0]  # repeats and both ends
    for predecessor in (False, True):
        for k in (1, 2, 5, 17, n // 2, n - 2, n - 1):
            got = call_knn(x, v, p, kernel, ls, k, predecessor=predecessor)
            assert_knn_equal(got, np_brute_knn(dist, k, None, predecessor))
            got = call_knn(x, v, p, kernel, ls, k, queries=queries, predecessor=predecessor)
            assert_knn_equal(got, np_brute_knn(dist, k, queries, predecessor))
            # a repeated query gives an identical row
            np.testing.assert_array_equal(got[0][0], got[0][2])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_brute_knn_other_seeds_and_sizes(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(150, 300))
    d = int(rng.choice([1, 2, 3, 8]))
    kernel = KERNELS[seed % 4]
    x, v, p, ls = make_problem(seed, n, d, 16, kernel)
    dist = np_distances(x, v, p, kernel, ls, S2)
    for predecessor in (False, True):
        for k in (1, 10, n - 1):
            assert_knn_equal(
                call_knn(x, v, p, kernel, ls, k, predecessor=predecessor),
                np_brute_knn(dist, k, None, predecessor),
            )


@pytest.mark.parametrize("kernel", KERNELS)
def test_duplicated_points_ties_broken_by_smaller_index(kernel):
    base, n = 50, 150
    # points 50..149 copy points 0..49 twice, in scrambled order
    rng = np.random.default_rng(7)
    originals = np.concatenate([rng.permutation(base), rng.permutation(base)])
    pairs = [(base + a, int(o)) for a, o in enumerate(originals)]
    x, v, p, ls = make_problem(11, n, 2, 8, kernel, duplicate_of=pairs)
    dist = np_distances(x, v, p, kernel, ls, S2)
    groups = {o: sorted([o] + [c for c, oo in pairs if oo == o]) for o in range(base)}
    for predecessor in (False, True):
        for k in (1, 2, 3, 10, n - 1):
            got = call_knn(x, v, p, kernel, ls, k, predecessor=predecessor)
            assert_knn_equal(got, np_brute_knn(dist, k, None, predecessor))
            idx, dst = got
            for i in range(n):
                group = groups[i if i < base else dict(pairs)[i]]
                copies = [j for j in group if j != i and (not predecessor or j < i)]
                want = copies[:k]
                # the copies come first, at distance exactly 0, in index order
                assert idx[i, : len(want)].tolist() == want
                assert np.all(dst[i, : len(want)] == 0.0)
                # every exact tie in the row is in index order
                row_i, row_d = idx[i], dst[i]
                tie = (row_d[1:] == row_d[:-1]) & (row_i[1:] >= 0)
                assert np.all(row_i[1:][tie] > row_i[:-1][tie])


def test_exact_duplicates_with_zero_low_rank_part():
    x = np.array([[0.0], [0.0], [0.0], [0.0], [5.0], [9.0]])
    v = np.zeros((6, 1))
    p = np.ones(6)
    idx, dst = ref.brute_knn(x, v, p, kernel="rbf", lengthscale=1.0, variance=1.0, k=3, queries=np.array([2, 3, 0]))
    assert idx.tolist() == [[0, 1, 3], [0, 1, 2], [1, 2, 3]]
    assert np.all(dst == 0.0)
    idx, dst = ref.brute_knn(
        x, v, p, kernel="rbf", lengthscale=1.0, variance=1.0, k=4, queries=np.array([3]), predecessor=True
    )
    assert idx.tolist() == [[0, 1, 2, -1]]
    assert dst[0, 3] == np.inf


def test_predecessor_mode_pads_and_allows_large_k():
    n = 30
    x, v, p, ls = make_problem(5, n, 3, 6, "matern32")
    dist = np_distances(x, v, p, "matern32", ls, S2)
    for k in (1, 7, n - 1, n, n + 5):
        idx, dst = call_knn(x, v, p, "matern32", ls, k, predecessor=True)
        assert idx.shape == dst.shape == (n, k)
        assert np.all(idx[0] == -1) and np.all(np.isinf(dst[0]))
        for i in range(n):
            filled = min(i, k)
            assert np.all((idx[i, :filled] >= 0) & (idx[i, :filled] < i))
            assert np.all(idx[i, filled:] == -1)
            assert np.all(dst[i, filled:] == np.inf)
        assert_knn_equal((idx, dst), np_brute_knn(dist, k, None, True))


def test_empty_queries_and_strided_inputs():
    n = 60
    x, v, p, ls = make_problem(3, n, 3, 10, "matern52")
    idx, dst = call_knn(x, v, p, "matern52", ls, 4, queries=np.array([], dtype=np.int64))
    assert idx.shape == dst.shape == (0, 4)
    want = call_knn(x, v, p, "matern52", ls, 9)
    # Fortran order, strided views, float32-castable lists all give identical answers
    xf, vf = np.asfortranarray(x), np.asfortranarray(v)
    got = call_knn(xf, vf, p, "matern52", ls, 9)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    wide = np.zeros((n, 2 * 3))
    wide[:, ::2] = x
    got = call_knn(wide[:, ::2], v, p, "matern52", list(ls), 9, queries=list(range(n)))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_scalar_lengthscale_equals_repeated_vector():
    x, v, p, _ = make_problem(4, 50, 2, 5, "rbf")
    a = call_knn(x, v, p, "rbf", 0.3, 5)
    b = call_knn(x, v, p, "rbf", np.array([0.3, 0.3]), 5)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# --------------------------------------------------------------------------------------
# covariance_block and residual_distance_block
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
def test_covariance_block_matches_formula(kernel):
    rng = np.random.default_rng(21)
    x1, x2 = rng.normal(size=(13, 3)), rng.normal(size=(7, 3))
    ls = np.array([0.5, 1.5, 0.9])
    got = ref.covariance_block(x1, x2, kernel=kernel, lengthscale=ls, variance=2.5)
    assert got.shape == (13, 7) and got.dtype == np.float64
    np.testing.assert_allclose(got, np_cov(x1, x2, kernel, ls, 2.5), rtol=1e-14, atol=1e-300)
    same = ref.covariance_block(x1, x1, kernel=kernel, lengthscale=ls, variance=2.5)
    np.testing.assert_array_equal(np.diag(same), 2.5)
    np.testing.assert_array_equal(same, same.T)


def test_covariance_block_hand_values():
    # r = 1 exactly: x - y = lengthscale
    x1, x2 = np.array([[0.75]]), np.array([[0.25]])
    kw = {"lengthscale": 0.5, "variance": 2.0}
    s3, s5 = np.sqrt(3.0), np.sqrt(5.0)
    want = {
        "rbf": 2.0 * np.exp(-0.5),
        "matern12": 2.0 * np.exp(-1.0),
        "matern32": 2.0 * (1.0 + s3) * np.exp(-s3),
        "matern52": 2.0 * (1.0 + s5 + 5.0 / 3.0) * np.exp(-s5),
    }
    for kernel, w in want.items():
        got = ref.covariance_block(x1, x2, kernel=kernel, **kw)[0, 0]
        assert got == pytest.approx(w, rel=1e-15)


def test_residual_distance_block_matches_numpy():
    n = 80
    x, v, p, ls = make_problem(9, n, 2, 10, "matern12")
    dist = np_distances(x, v, p, "matern12", ls, S2)
    rows = np.array([3, 3, 0, 79, 40])
    cols = np.array([79, 3, 7, 40, 40, 0])
    got = ref.residual_distance_block(x, v, p, rows, cols, kernel="matern12", lengthscale=ls, variance=S2)
    assert got.shape == (5, 6)
    assert_dist_close(got, dist[np.ix_(rows, cols)])
    assert np.all(got[rows[:, None] == cols[None, :]] == 0.0)
    full = ref.residual_distance_block(
        x, v, p, np.arange(n), np.arange(n), kernel="matern12", lengthscale=ls, variance=S2
    )
    np.testing.assert_array_equal(full, full.T)
    assert np.all((full >= 0.0) & (full <= 1.0))


# --------------------------------------------------------------------------------------
# input validation and immutability
# --------------------------------------------------------------------------------------


def _good():
    x, v, p, ls = make_problem(2, 20, 2, 4, "rbf")
    return {"coords": x, "v": v, "p": p, "kernel": "rbf", "lengthscale": ls, "variance": S2, "k": 3}


def _knn(**kw):
    a = _good()
    a.update(kw)
    return ref.brute_knn(a.pop("coords"), a.pop("v"), a.pop("p"), **a)


@pytest.mark.parametrize(
    "change, name",
    [
        (lambda g: {"coords": g["coords"][:, 0]}, "coords"),
        (lambda g: {"coords": g["coords"][:, :1]}, "lengthscale"),
        (lambda g: {"coords": g["coords"].reshape(20, 2, 1)}, "coords"),
        (lambda g: {"coords": np.where(np.arange(20)[:, None] == 3, np.nan, g["coords"])}, "coords"),
        (lambda g: {"v": g["v"][:19]}, "v"),
        (lambda g: {"v": g["v"][:, 0]}, "v"),
        (lambda g: {"p": g["p"][:19]}, "p"),
        (lambda g: {"p": np.where(np.arange(20) == 5, 0.0, g["p"])}, "p"),
        (lambda g: {"p": -g["p"]}, "p"),
        (lambda g: {"kernel": "matern72"}, "kernel"),
        (lambda g: {"lengthscale": np.array([1.0, 1.0, 1.0])}, "lengthscale"),
        (lambda g: {"lengthscale": np.array([1.0, -1.0])}, "lengthscale"),
        (lambda g: {"lengthscale": 0.0}, "lengthscale"),
        (lambda g: {"variance": 0.0}, "variance"),
        (lambda g: {"variance": float("nan")}, "variance"),
        (lambda g: {"k": 0}, "k"),
        (lambda g: {"k": -2}, "k"),
        (lambda g: {"k": 20}, "k"),
        (lambda g: {"k": 0, "predecessor": True}, "k"),
        (lambda g: {"queries": np.array([0, 20])}, "queries"),
        (lambda g: {"queries": np.array([-1])}, "queries"),
        (lambda g: {"queries": np.array([0.5, 1.0])}, "queries"),
        (lambda g: {"queries": np.array([[0, 1]])}, "queries"),
    ],
)
def test_brute_knn_rejects_bad_input(change, name):
    with pytest.raises(ValueError, match=name) as info:
        _knn(**change(_good()))
    assert str(info.value).startswith(name), str(info.value)


def test_error_messages_show_the_value():
    with pytest.raises(ValueError, match=r"k .*got 20"):
        _knn(k=20)
    with pytest.raises(ValueError, match=r"queries.*= 20"):
        _knn(queries=np.array([1, 20]))
    with pytest.raises(ValueError, match="matern72"):
        _knn(kernel="matern72")
    with pytest.raises(ValueError, match=r"\(19, 4\)"):
        _knn(v=_good()["v"][:19])


def test_block_functions_reject_bad_input():
    g = _good()
    kw = {"kernel": "rbf", "lengthscale": g["lengthscale"], "variance": S2}
    x, v, p = g["coords"], g["v"], g["p"]
    with pytest.raises(ValueError, match="^x2"):
        ref.covariance_block(x, np.zeros((3, 3)), **kw)
    with pytest.raises(ValueError, match="^x1"):
        ref.covariance_block(np.zeros(3), x, **kw)
    with pytest.raises(ValueError, match="^kernel"):
        ref.covariance_block(x, x, kernel="cubic", lengthscale=1.0, variance=1.0)
    with pytest.raises(ValueError, match="^rows"):
        ref.residual_distance_block(x, v, p, np.array([20]), np.array([0]), **kw)
    with pytest.raises(ValueError, match="^cols"):
        ref.residual_distance_block(x, v, p, np.array([0]), np.array([-3]), **kw)
    with pytest.raises(ValueError, match="^p"):
        ref.residual_distance_block(x, v, p[:5], np.array([0]), np.array([1]), **kw)


def test_inputs_are_not_modified():
    g = _good()
    x, v, p, ls = g["coords"], g["v"], g["p"], g["lengthscale"]
    queries = np.array([4, 4, 0, 19])
    rows, cols = np.array([1, 2]), np.array([2, 3, 1])
    before = [a.copy() for a in (x, v, p, ls, queries, rows, cols)]
    for a in (x, v, p, ls, queries, rows, cols):
        a.setflags(write=False)  # read-only arrays are accepted
    ref.brute_knn(x, v, p, kernel="rbf", lengthscale=ls, variance=S2, k=5, queries=queries)
    ref.brute_knn(x, v, p, kernel="rbf", lengthscale=ls, variance=S2, k=5, predecessor=True)
    ref.covariance_block(x, x, kernel="rbf", lengthscale=ls, variance=S2)
    ref.residual_distance_block(x, v, p, rows, cols, kernel="rbf", lengthscale=ls, variance=S2)
    for a, b in zip((x, v, p, ls, queries, rows, cols), before):
        np.testing.assert_array_equal(a, b)
