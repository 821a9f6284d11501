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


def test_residual_knn_default_inducing_larger_than_small_n(coords):
    """The default inducing=256 cannot be used with 30 points; the error says so."""
    with raises_typed(InvalidArgumentError, "inducing=256", f"[1, {N}]"):
        rg.residual_knn(coords, 3, rg.RBF(0.3))
