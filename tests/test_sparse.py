"""KnnResult as sparse matrices: the neighbour graph (to_csr) and the Vecchia pattern."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse

import residual_gpu as rg
from residual_gpu.errors import InvalidArgumentError

N, K = 300, 7


@pytest.fixture(scope="module")
def coords():
    x = np.random.default_rng(8).random((N, 2))
    x[[40, 41]] = x[7]  # duplicates: their distance to each other is exactly 0.0
    return x


@pytest.fixture(scope="module", params=["brute", "tree"])
def index(request, coords):
    prob = rg.ResidualProblem(coords, kernel=rg.Matern32(lengthscale=0.2), inducing=20, seed=1)
    return rg.ResidualIndex(prob, backend="cpu", method=request.param, leaf_size=16)


def assert_graph_is_result(graph, res, n):
    """graph holds exactly the result's non-padding neighbours, the distances bit for bit."""
    assert isinstance(graph, scipy.sparse.csr_array)
    assert graph.shape == (res.indices.shape[0], n) and graph.dtype == np.float64
    assert graph.has_canonical_format
    kept = res.indices >= 0
    assert graph.nnz == np.count_nonzero(kept)
    for r in range(graph.shape[0]):
        cols = graph.indices[graph.indptr[r]:graph.indptr[r + 1]]
        vals = graph.data[graph.indptr[r]:graph.indptr[r + 1]]
        order = np.argsort(res.indices[r][kept[r]])
        np.testing.assert_array_equal(cols, res.indices[r][kept[r]][order])
        np.testing.assert_array_equal(vals, res.distances[r][kept[r]][order])


@pytest.mark.parametrize("kind", ["all", "subset", "predecessor", "new"])
def test_to_csr_is_the_result(index, coords, kind):
    kw = {"all": {}, "subset": {"queries": np.array([5, 0, 7, 7, N - 1])}, "predecessor": {"predecessor": True},
          "new": {"query_coords": np.random.default_rng(2).random((9, 2))}}[kind]
    res = index.query(K, **kw)
    assert_graph_is_result(res.to_csr(), res, N)


def test_zero_distance_stays_a_stored_entry(index, coords):
    res = index.query(K, queries=np.array([7, 40]))
    assert res.distances[0, 0] == 0.0 and res.distances[0, 1] == 0.0  # the duplicates 40 and 41
    graph = res.to_csr()
    assert graph.nnz == 2 * K
    assert set(graph[[0]].indices) >= {40, 41}
    assert np.count_nonzero(graph.data == 0.0) >= 4  # stored although zero
    # dense form: the zeros are there but indistinguishable; the pattern is indices/indptr
    assert graph.toarray()[0, 40] == 0.0


def test_vecchia_pattern(index):
    res = index.query(K, predecessor=True)
    pattern = res.vecchia_pattern()
    assert isinstance(pattern, scipy.sparse.csr_array)
    assert pattern.shape == (N, N) and pattern.dtype == bool and pattern.has_canonical_format
    assert (scipy.sparse.triu(pattern, k=1)).nnz == 0, "not lower triangular"
    np.testing.assert_array_equal(pattern.diagonal(), np.ones(N, dtype=bool))
    assert pattern.nnz == N + np.count_nonzero(res.indices >= 0)
    for i in (0, 1, 2, K, K + 1, N - 1):
        row = pattern.indices[pattern.indptr[i]:pattern.indptr[i + 1]]
        want = np.sort(np.append(res.indices[i][res.indices[i] >= 0], i))
        np.testing.assert_array_equal(row, want)
    assert pattern.indptr[1] == 1 and pattern.indptr[2] == 3  # point 0: itself only; point 1: 0 and 1
    # row for row one entry (the diagonal) more than the neighbour graph
    np.testing.assert_array_equal(pattern.indptr - np.arange(N + 1), res.to_csr().indptr)


def test_vecchia_pattern_of_explicit_all_points_queries(index):
    default = index.query(K, predecessor=True).vecchia_pattern()
    explicit = index.query(K, predecessor=True, queries=np.arange(N)).vecchia_pattern()
    assert (default != explicit).nnz == 0


@pytest.mark.parametrize("kind, needle", [
    ("plain", "got predecessor=False with all points"),
    ("subset", "got predecessor=True with 3 dataset queries"),
    ("shuffled", f"got predecessor=True with {N} dataset queries"),
    ("new", "got predecessor=False with new locations (query_coords)"),
])
def test_vecchia_pattern_needs_an_all_points_predecessor_query(index, kind, needle):
    kw = {"plain": {}, "subset": {"queries": np.array([3, 4, 5]), "predecessor": True},
          "shuffled": {"queries": np.arange(N)[::-1], "predecessor": True},
          "new": {"query_coords": np.zeros((2, 2))}}[kind]
    res = index.query(K, **kw)
    with pytest.raises(InvalidArgumentError, match="vecchia_pattern\\(\\) needs the result of an all-points "
                                                   "predecessor query") as info:
        res.vecchia_pattern()
    assert needle in str(info.value)


def test_result_records_its_queries(index):
    res = index.query(K, queries=np.array([9, 2]))
    np.testing.assert_array_equal(res.query_ids, [9, 2])
    assert res.n_points == N and res.predecessor is False
    res = index.query(K, predecessor=True)
    np.testing.assert_array_equal(res.query_ids, np.arange(N))
    assert res.predecessor is True
    assert index.query(K, query_coords=np.zeros((1, 2))).query_ids is None
