"""Argument errors through the public API: ResidualIndex(...).query(...) and residual_knn(...).

Every rejection must be one of the package's typed errors (InvalidArgumentError, a
ValueError; InvalidTypeError, a TypeError) and its message must name the argument and
show the rejected value.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import residual_gpu as rg
from residual_gpu.errors import InvalidArgumentError, InvalidTypeError, ResidualGPUError

N = 30


@pytest.fixture(scope="module")
def coords():
    return np.random.default_rng(21).random((N, 2))


@pytest.fixture(scope="module")
def problem(coords):
    return rg.ResidualProblem(coords, kernel=rg.Matern32(0.3), inducing=6, seed=0)


@pytest.fixture(scope="module")
def index(problem):
    return rg.ResidualIndex(problem, backend="cpu")


def raises_typed(cls, *needles):
    """pytest.raises for a package error whose message contains every needle."""

    class _Check:
        def __enter__(self):
            self._cm = pytest.raises(cls)
            self.info = self._cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            out = self._cm.__exit__(*exc)
            err = self.info.value
            assert isinstance(err, ResidualGPUError), type(err)
            assert isinstance(err, ValueError if issubclass(cls, InvalidArgumentError) else TypeError)
            msg = str(err)
            for needle in needles:
                if isinstance(needle, re.Pattern):
                    assert needle.search(msg), f"{needle.pattern!r} not found in message {msg!r}"
                else:
                    assert needle in msg, f"{needle!r} not in message {msg!r}"
            return out

    return _Check()


# --------------------------------------------------------------------------------------
# k
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, -1, -100])
def test_k_below_one(index, k):
    with raises_typed(InvalidArgumentError, f"k={k}", "k must"):
        index.query(k)
    with raises_typed(InvalidArgumentError, f"k={k}"):
        index.query(k, predecessor=True)
    with raises_typed(InvalidArgumentError, f"k={k}"):
        index.query(k, query_coords=np.zeros((2, 2)))


@pytest.mark.parametrize("k,shown", [(2.5, "2.5"), (3.0, "3.0"), ("3", "'3'"), (None, "None"), (True, "True"),
                                     (np.float64(4.0), "4.0")])
def test_k_not_an_integer(index, k, shown):
    with raises_typed(InvalidTypeError, "k must", shown):
        index.query(k)


def test_numpy_integer_k_accepted(index):
    assert index.query(np.int32(3)).indices.shape == (N, 3)


def test_k_too_large_for_dataset_queries(index):
    with raises_typed(InvalidArgumentError, f"k={N}", f"[1, {N - 1}]"):
        index.query(N)
    with raises_typed(InvalidArgumentError, f"k={N + 7}"):
        index.query(N + 7, queries=[1, 2])
    res = index.query(N - 1)  # the largest admissible k: every other point
    assert res.indices.shape == (N, N - 1)
    for i in range(N):
        assert sorted(res.indices[i].tolist()) == [j for j in range(N) if j != i]


def test_k_too_large_for_query_coords(index):
    xq = np.random.default_rng(1).random((3, 2))
    with raises_typed(InvalidArgumentError, f"k={N + 1}", f"[1, {N}]"):
        index.query(N + 1, query_coords=xq)
    res = index.query(N, query_coords=xq)  # every dataset point is admissible for a new location
    assert res.indices.shape == (3, N)
    for row in res.indices:
        assert sorted(row.tolist()) == list(range(N))
    assert np.all(np.isfinite(res.distances))


def test_large_k_allowed_in_predecessor_mode(index):
    k = N - 1  # more than most rows have: padded; no row can have more than n - 1
    with pytest.raises(rg.InvalidArgumentError, match="k"):
        index.query(N, predecessor=True)
    res = index.query(k, predecessor=True)
    assert res.indices.shape == (N, k) and res.distances.shape == (N, k)
    assert res.indices.dtype == np.int64 and res.distances.dtype == np.float64
    for i in range(N):
        assert sorted(res.indices[i, :i].tolist()) == list(range(i))
        assert np.all(res.indices[i, i:] == -1)
        assert np.all(np.isinf(res.distances[i, i:])) and np.all(res.distances[i, i:] > 0)
        assert np.all(np.isfinite(res.distances[i, :i]))
        assert np.all(np.diff(res.distances[i, :i]) >= 0)


def test_predecessor_padding_with_selected_queries(index):
    res = index.query(4, queries=[0, 2, 10], predecessor=True)
    np.testing.assert_array_equal(res.indices[0], [-1, -1, -1, -1])
    assert sorted(res.indices[1, :2].tolist()) == [0, 1]
    np.testing.assert_array_equal(res.indices[1, 2:], [-1, -1])
    assert np.all(res.indices[2] < 10) and np.all(res.indices[2] >= 0)
    assert np.all(np.isinf(res.distances[0]))


@pytest.mark.parametrize("case", ["query_zero", "single_point"])
def test_predecessor_query_without_any_admissible_point(index, case):
    if case == "query_zero":
        res = index.query(2, queries=[0], predecessor=True)
    else:  # one point: no query can ever have a neighbour, so any k is too large
        one = rg.ResidualProblem(np.zeros((1, 2)), kernel=rg.RBF(1.0), inducing=1)
        with pytest.raises(rg.InvalidArgumentError, match="k"):
            rg.ResidualIndex(one).query(1, predecessor=True)
        return
    np.testing.assert_array_equal(res.indices, [[-1, -1]])
    assert np.all(np.isinf(res.distances))


# --------------------------------------------------------------------------------------
# queries / query_coords / predecessor
# --------------------------------------------------------------------------------------


def shows(name, value):
    """Regex for ``name=value`` in a message; numpy >= 2 may print the value as np.int64(value)."""
    return re.compile(re.escape(name) + r"=(np\.\w+\()?" + re.escape(str(value)) + r"\b")


@pytest.mark.parametrize("queries,shown", [([N], shows("queries[0]", N)), ([0, 3, N + 4], shows("queries[2]", N + 4)),
                                           ([-1], shows("queries[0]", -1)), (np.array([2, -5]), shows("queries[1]", -5)),
                                           (N, shows("queries[0]", N))])
def test_queries_out_of_range(index, queries, shown):
    with raises_typed(InvalidArgumentError, shown, f"[0, {N})"):
        index.query(3, queries=queries)


@pytest.mark.parametrize("queries", [[0.0, 1.0], np.array([1.5]), np.array([True, False]), ["a", "b"]])
def test_queries_wrong_dtype(index, queries):
    with raises_typed(InvalidTypeError, "queries", "dtype"):
        index.query(3, queries=queries)


def test_queries_wrong_shape_or_empty(index):
    with raises_typed(InvalidArgumentError, "queries", "shape=(2, 2)"):
        index.query(3, queries=np.array([[0, 1], [2, 3]]))
    with raises_typed(InvalidArgumentError, "queries", "shape=(0,)"):
        index.query(3, queries=np.array([], dtype=np.int64))
    with raises_typed(InvalidArgumentError, "queries"):
        index.query(3, queries=[])


def test_query_coords_wrong_width(index):
    with raises_typed(InvalidArgumentError, "query_coords", "shape=(4, 3)", "2 column"):
        index.query(3, query_coords=np.zeros((4, 3)))
    with raises_typed(InvalidArgumentError, "query_coords"):
        index.query(3, query_coords=np.array([[0.0, np.inf]]))
    with raises_typed(InvalidTypeError, "query_coords"):
        index.query(3, query_coords="here")


def test_queries_and_query_coords_together(index):
    with raises_typed(InvalidArgumentError, "queries", "query_coords", "not both"):
        index.query(3, queries=[0, 1], query_coords=np.zeros((2, 2)))


def test_predecessor_with_query_coords(index):
    with raises_typed(InvalidArgumentError, "predecessor", "query_coords"):
        index.query(3, query_coords=np.zeros((2, 2)), predecessor=True)


@pytest.mark.parametrize("value,shown", [(1, "predecessor=1"), ("yes", "predecessor='yes'"),
                                         (None, "predecessor=None")])
def test_predecessor_must_be_bool(index, value, shown):
    with raises_typed(InvalidTypeError, shown):
        index.query(3, predecessor=value)


def test_numpy_bool_predecessor_accepted(index):
    a = index.query(3, predecessor=np.True_)
    b = index.query(3, predecessor=True)
    np.testing.assert_array_equal(a.indices, b.indices)


# --------------------------------------------------------------------------------------
# ResidualIndex construction
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["gpu9", "numpy", ""])
def test_unknown_backend(problem, backend):
    with raises_typed(InvalidArgumentError, "backend", f"backend={backend!r}", "cpu"):
        rg.ResidualIndex(problem, backend=backend)


@pytest.mark.parametrize("backend", [None, 0, ["cpu"]])
def test_backend_not_a_string(problem, backend):
    with raises_typed(InvalidTypeError, "backend", f"backend={backend!r}"):
        rg.ResidualIndex(problem, backend=backend)


@pytest.mark.parametrize("method", ["kdtree", "BRUTE-FORCE", ""])
def test_unknown_method(problem, method):
    with raises_typed(InvalidArgumentError, "method", f"method={method!r}", "brute"):
        rg.ResidualIndex(problem, method=method)


def test_method_not_a_string_is_rejected(problem):
    with pytest.raises(ResidualGPUError, match="method=3"):
        rg.ResidualIndex(problem, method=3)


def test_method_not_a_string_is_a_type_error(problem):
    with pytest.raises(InvalidTypeError):
        rg.ResidualIndex(problem, method=3)


@pytest.mark.parametrize("bad,shown", [(None, "problem=None"), ("problem", "problem='problem'"),
                                       (np.zeros((5, 2)), "problem=array(shape=(5, 2), dtype=float64)")])
def test_problem_must_be_a_residual_problem(bad, shown):
    with raises_typed(InvalidTypeError, "problem must be a ResidualProblem", shown):
        rg.ResidualIndex(bad)


def test_index_resolves_method_and_backend(problem):
    idx = rg.ResidualIndex(problem, backend="CPU", method="auto")
    assert idx.backend == "cpu" and idx.method == "brute"
    assert "cpu" in repr(idx)


# --------------------------------------------------------------------------------------
# residual_knn
# --------------------------------------------------------------------------------------


def test_residual_knn_matches_index(coords, problem, index):
    idx, dist = rg.residual_knn(coords, 4, rg.Matern32(0.3), inducing=6, seed=0, backend="cpu")
    res = index.query(4)
    np.testing.assert_array_equal(idx, res.indices)
    np.testing.assert_array_equal(dist, res.distances)
    a, b = res  # KnnResult unpacks like a tuple
    assert a is res.indices and b is res.distances


@pytest.mark.parametrize("kwargs,cls,needles", [
    ({"k": 0}, InvalidArgumentError, ["k=0"]),
    ({"k": N}, InvalidArgumentError, [f"k={N}"]),
    ({"k": 1.5}, InvalidTypeError, ["k must", "1.5"]),
    ({"k": 3, "queries": [N]}, InvalidArgumentError, [shows("queries[0]", N)]),
    ({"k": 3, "queries": [0.5]}, InvalidTypeError, ["queries", "float64"]),
    ({"k": 3, "query_coords": np.zeros((2, 5))}, InvalidArgumentError, ["query_coords", "(2, 5)"]),
    ({"k": 3, "queries": [1], "query_coords": np.zeros((1, 2))}, InvalidArgumentError, ["queries", "query_coords"]),
    ({"k": 3, "predecessor": True, "query_coords": np.zeros((1, 2))}, InvalidArgumentError, ["predecessor"]),
    ({"k": 3, "backend": "tpu"}, InvalidArgumentError, ["backend='tpu'"]),
    ({"k": 3, "method": "kdtree"}, InvalidArgumentError, ["method='kdtree'"]),
    ({"k": 3, "inducing": 0}, InvalidArgumentError, ["inducing=0"]),
    ({"k": 3, "inducing": N + 1}, InvalidArgumentError, [f"inducing={N + 1}"]),
    ({"k": 3, "seed": -2}, InvalidArgumentError, ["seed=-2"]),
])
def test_residual_knn_errors(coords, kwargs, cls, needles):
    kwargs = dict(kwargs)
    k = kwargs.pop("k")
    kwargs.setdefault("inducing", 6)
    with raises_typed(cls, *needles):
        rg.residual_knn(coords, k, rg.Matern32(0.3), **kwargs)


def test_residual_knn_bad_kernel_and_coords(coords):
    with raises_typed(InvalidTypeError, "kernel"):
        rg.residual_knn(coords, 3, kernel=42, inducing=6)
    with raises_typed(InvalidArgumentError, "kernel", "'cosine'"):
        rg.residual_knn(coords, 3, kernel="cosine", inducing=6)
    with raises_typed(InvalidArgumentError, "lengthscale"):
        rg.residual_knn(coords, 3, kernel=rg.RBF([0.1, 0.2, 0.3]), inducing=6)
    bad = np.array(coords)
    bad[4, 0] = np.nan
    with raises_typed(InvalidArgumentError, "coords[4, 0]", "nan"):
        rg.residual_knn(bad, 3, kernel=rg.RBF(0.3), inducing=6)


def test_residual_knn_inducing_larger_than_small_n(coords):
    """An explicit inducing=256 cannot be used with 30 points; the error says so. The default
    (min(256, n // 2)) works there (tests/test_build.py)."""
    with raises_typed(InvalidArgumentError, "inducing=256", f"[1, {N}]"):
        rg.residual_knn(coords, 3, rg.RBF(0.3), inducing=256)
    idx, _ = rg.residual_knn(coords, 3, rg.RBF(0.3))
    assert idx.shape == (N, 3)


# --------------------------------------------------------------------------------------
# coordinates too many lengthscales apart (the kernel would overflow float64)
# --------------------------------------------------------------------------------------

SPREAD_N = 20


def _spread_case(case):
    """(coords, kernel, inducing array, far query coords) for one way of overflowing r^2.

    The query coordinates are far from a problem that is itself fine (built with the same
    kernel on ``near``), so that the query-time check is what has to catch them.
    """
    x = np.random.default_rng(5).random((SPREAD_N, 2))
    if case == "far_coords":  # ~1e160 apart, lengthscale 1
        kern = rg.Matern52(1.0)
        far = x * 1e160
        near, xq = x, x[:3] + np.array([1e160, 0.0])
    elif case == "tiny_lengthscale":  # ordinary coordinates, lengthscale 1e-160
        kern = rg.Matern52(1e-160)
        far = x
        near, xq = np.zeros((SPREAD_N, 2)), x[:3]
    elif case == "tiny_ard_dimension":  # only dimension 1 has a tiny lengthscale
        kern = rg.Matern52([0.3, 1e-160])
        far = x
        near = np.column_stack([x[:, 0], np.zeros(SPREAD_N)])
        xq = x[:3]
    else:  # "difference_overflows": max - min overflows float64, whatever the lengthscale
        kern = rg.Matern52(1e300)
        far = np.array(x) * 1e307
        far[0, 0], far[1, 0] = -1e308, 1e308
        near = np.array(x)
        near[:, 0] = 1e308
        xq = np.array(x[:3])
        xq[:, 0] = -1e308
    return far, kern, far[:4] + 0.0, near, xq


SPREAD_CASES = ["far_coords", "tiny_lengthscale", "tiny_ard_dimension", "difference_overflows"]


def _spread_needles(name, case):
    needles = [name, "lengthscale="]
    needles.append("overflows float64")
    if case == "tiny_ard_dimension":
        needles += ["column 1", "lengthscale=[0.3, 1e-160]"]
    elif case == "difference_overflows":
        needles += ["column 0", "1e+308", "lengthscale=1e+300"]
    elif case == "far_coords":
        needles += ["lengthscales apart", "lengthscale=1.0"]
    else:
        needles += ["lengthscales apart", "lengthscale=1e-160"]
    return needles


@pytest.mark.parametrize("case", SPREAD_CASES)
def test_spread_rejected_with_kmeans_inducing(case):
    far, kern, _u, _near, _xq = _spread_case(case)
    with raises_typed(InvalidArgumentError, *_spread_needles("coords", case)):
        rg.ResidualProblem(far, kernel=kern, inducing=3)


@pytest.mark.parametrize("case", SPREAD_CASES)
def test_spread_rejected_with_inducing_array(case):
    far, kern, u, near, _xq = _spread_case(case)
    with raises_typed(InvalidArgumentError, *_spread_needles("coords", case)):
        rg.ResidualProblem(far, kernel=kern, inducing=u)
    # coords alone are fine; the given inducing points are what is too far away
    with raises_typed(InvalidArgumentError, *_spread_needles("inducing", case)):
        rg.ResidualProblem(near, kernel=kern, inducing=u)


@pytest.mark.parametrize("case", SPREAD_CASES)
def test_spread_rejected_by_from_factors(case):
    far, kern, u, near, _xq = _spread_case(case)
    v = np.full((SPREAD_N, 4), 0.1)
    p = np.full(SPREAD_N, 0.5)
    with raises_typed(InvalidArgumentError, *_spread_needles("coords", case)):
        rg.ResidualProblem.from_factors(far, v=v, p=p, kernel=kern)
    with raises_typed(InvalidArgumentError, *_spread_needles("coords", case)):
        rg.ResidualProblem.from_factors(far, v=v, p=p, kernel=kern, inducing=u)
    with raises_typed(InvalidArgumentError, *_spread_needles("inducing", case)):
        rg.ResidualProblem.from_factors(near, v=v, p=p, kernel=kern, inducing=u)


@pytest.mark.parametrize("case", SPREAD_CASES)
def test_spread_rejected_for_query_coords(case):
    _far, kern, _u, near, xq = _spread_case(case)
    prob = rg.ResidualProblem(near, kernel=kern, inducing=2)
    index = rg.ResidualIndex(prob, backend="cpu")
    with raises_typed(InvalidArgumentError, *_spread_needles("query_coords", case)):
        index.query(3, query_coords=xq)
    with raises_typed(InvalidArgumentError, *_spread_needles("query_coords", case)):
        prob.factors_at(xq)
    assert index.query(3, query_coords=near[:2]).indices.shape == (2, 3)  # the index still works


@pytest.mark.parametrize("case", SPREAD_CASES)
def test_spread_rejected_by_residual_knn(case):
    far, kern, u, near, xq = _spread_case(case)
    with raises_typed(InvalidArgumentError, *_spread_needles("coords", case)):
        rg.residual_knn(far, 3, kern, inducing=3, backend="cpu")
    with raises_typed(InvalidArgumentError, *_spread_needles("inducing", case)):
        rg.residual_knn(near, 3, kern, inducing=u, backend="cpu")
    with raises_typed(InvalidArgumentError, *_spread_needles("query_coords", case)):
        rg.residual_knn(near, 3, kern, inducing=2, query_coords=xq, backend="cpu")


@pytest.mark.parametrize("log_r2", [282, 304])
def test_spread_below_overflow_but_over_the_limit(log_r2):
    """A scaled squared distance that still fits in float64 but exceeds the limit is rejected:
    at 1e304 the CPU fast path's Matern 5/2 (exp clamped at -708) is off by ~5e-4 and returned
    wrong neighbours before this check."""
    from residual_gpu._validation import MAX_SCALED_SQ_DISTANCE

    assert 10.0**log_r2 > MAX_SCALED_SQ_DISTANCE
    x = np.random.default_rng(6).random((SPREAD_N, 1))
    x[0, 0], x[1, 0] = 0.0, 1.0
    with raises_typed(InvalidArgumentError, f"coords spread 1.0e+{log_r2 // 2} lengthscales apart",
                      f"scaled squared distance 1.0e+{log_r2} exceeds {MAX_SCALED_SQ_DISTANCE:.0e}",
                      "column 0", "lengthscale=1.0"):
        rg.ResidualProblem(x * 10.0 ** (log_r2 / 2), kernel=rg.Matern52(1.0), inducing=2)


def test_spread_checked_before_expensive_work(monkeypatch):
    """The error comes before kmeans++, the Cholesky of K(U, U) and building V."""
    import residual_gpu.problem as problem_mod

    def boom(*args, **kwargs):
        raise AssertionError("expensive work ran before the spread check")

    monkeypatch.setattr(problem_mod, "kmeanspp_indices", boom)
    monkeypatch.setattr(problem_mod.ResidualProblem, "_set_inducing", boom)
    monkeypatch.setattr(problem_mod.ResidualProblem, "_solve_cross", boom)
    far, kern, u, near, _xq = _spread_case("far_coords")
    with raises_typed(InvalidArgumentError, "coords"):
        rg.ResidualProblem(far, kernel=kern, inducing=3)
    with raises_typed(InvalidArgumentError, "inducing"):
        rg.ResidualProblem(near, kernel=kern, inducing=u)
    with raises_typed(InvalidArgumentError, "inducing"):
        rg.ResidualProblem.from_factors(near, v=np.ones((SPREAD_N, 4)), p=np.ones(SPREAD_N), kernel=kern,
                                        inducing=u)


def test_spread_check_does_not_rescan_coords_at_query_time(monkeypatch):
    """factors_at checks the union from the bounds kept at construction, not all n points."""
    import residual_gpu._validation as validation

    x = np.random.default_rng(7).random((SPREAD_N, 2))
    prob = rg.ResidualProblem(x, kernel=rg.Matern32(0.3), inducing=3)
    seen = []
    real = validation.coordinate_bounds
    monkeypatch.setattr(validation, "coordinate_bounds", lambda a: seen.append(a.shape) or real(a))
    prob.factors_at(x[:2])
    assert seen == [(2, 2)]


def test_spread_inputs_not_modified():
    far, kern, u, near, xq = _spread_case("far_coords")
    ard = rg.Matern52([0.3, 1e-160])
    inputs = {"far": far, "u": u, "near": near, "xq": xq}
    before = {k: a.copy() for k, a in inputs.items()}
    ls_before = ard.lengthscale.copy()
    v, p = np.full((SPREAD_N, 4), 0.1), np.full(SPREAD_N, 0.5)
    v0, p0 = v.copy(), p.copy()
    with pytest.raises(InvalidArgumentError):
        rg.ResidualProblem(far, kernel=kern, inducing=3)
    with pytest.raises(InvalidArgumentError):
        rg.ResidualProblem(near, kernel=kern, inducing=u)
    with pytest.raises(InvalidArgumentError):
        rg.ResidualProblem(near, kernel=ard, inducing=u)
    with pytest.raises(InvalidArgumentError):
        rg.ResidualProblem.from_factors(near, v=v, p=p, kernel=kern, inducing=u)
    with pytest.raises(InvalidArgumentError):
        rg.ResidualIndex(rg.ResidualProblem(near, kernel=kern, inducing=2), backend="cpu").query(2, query_coords=xq)
    for k, a in inputs.items():
        np.testing.assert_array_equal(a, before[k], err_msg=k)
        assert a.flags.writeable, k
    np.testing.assert_array_equal(v, v0)
    np.testing.assert_array_equal(p, p0)
    assert v.flags.writeable and p.flags.writeable
    np.testing.assert_array_equal(ard.lengthscale, ls_before)
    assert kern.lengthscale == 1.0


@pytest.mark.parametrize("kernel_cls", [rg.Matern52, rg.Matern32, rg.Matern12, rg.RBF])
def test_spread_just_inside_the_limit_still_works(kernel_cls):
    """Two clusters ~sqrt(0.5 * limit) lengthscales apart: builds, and queries give finite distances."""
    from residual_gpu._validation import MAX_SCALED_SQ_DISTANCE

    rng = np.random.default_rng(8)
    x = rng.random((24, 2))
    ls = 0.5
    sep = ls * np.sqrt(0.5 * MAX_SCALED_SQ_DISTANCE)  # R2 = ((sep + ~1) / ls)^2 + ~4 ~ 0.5 * limit
    x[12:, 0] += sep
    kern = kernel_cls(ls)
    prob = rg.ResidualProblem(x, kernel=kern, inducing=6, seed=0)
    assert np.all(np.isfinite(prob.v)) and np.all(np.isfinite(prob.p))
    index = rg.ResidualIndex(prob, backend="cpu")
    xq = np.vstack([x[:2] + 0.01, x[12:14] - 0.01])
    res = index.query(4, query_coords=xq)
    assert np.all(np.isfinite(res.distances)) and not np.any(np.isnan(res.distances))
    assert np.all(res.distances < 1.0)  # correlated neighbours exist in each query's own cluster
    # each query's neighbours lie in its own cluster (the other is uncorrelated: |rho| = 0)
    assert np.all(res.indices[:2] < 12) and np.all(res.indices[2:] >= 12)
    dataset = index.query(3)
    assert np.all(np.isfinite(dataset.distances))
    same = rg.ResidualProblem.from_factors(x, v=prob.v, p=prob.p, kernel=kern, inducing=prob.inducing)
    assert np.all(np.isfinite(rg.ResidualIndex(same, backend="cpu").query(2, query_coords=xq).distances))


def test_check_scaled_spread_helper():
    """The helper itself: union bounds, the limit on the d-term sum, and the name it blames."""
    from residual_gpu._validation import MAX_SCALED_SQ_DISTANCE, check_scaled_spread

    a = np.array([[0.0, 5.0], [2.0, -1.0]])
    b = np.array([[-3.0, 0.0]])
    a0, b0 = a.copy(), b.copy()
    lo, hi = check_scaled_spread([("coords", a), ("inducing", b)], np.array([1.0, 2.0]))
    np.testing.assert_array_equal(lo, [-3.0, -1.0])
    np.testing.assert_array_equal(hi, [2.0, 5.0])
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)
    # every column just inside on its own, but the sum over 4 columns is not
    d = 4
    x = np.vstack([np.zeros(d), np.full(d, np.sqrt(0.5 * MAX_SCALED_SQ_DISTANCE))])
    check_scaled_spread([("coords", x[:, :1])], np.ones(1))
    with raises_typed(InvalidArgumentError, "coords", "scaled squared distance 2.0e+280"):
        check_scaled_spread([("coords", x)], np.ones(d))
    # bounds kept from before are accepted in place of an array; the later part is blamed
    with raises_typed(InvalidArgumentError, "query_coords (together with coords)"):
        check_scaled_spread([("coords", (lo, hi)), ("query_coords", np.array([[1e200, 0.0]]))], np.ones(2))
