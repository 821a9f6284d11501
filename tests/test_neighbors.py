"""ResidualNeighbors: scikit-learn's estimator rules, and the same bits as ResidualIndex.query."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse

import residual_gpu as rg
from residual_gpu.errors import InvalidArgumentError, InvalidTypeError

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from residual_gpu.neighbors import ResidualNeighbors

N, D, M, K = 260, 2, 14, 6
PARAMS = ["backend", "inducing", "kernel", "lengthscale", "method", "n_neighbors", "precision", "seed", "variance"]


@pytest.fixture(scope="module")
def coords():
    return np.random.default_rng(11).random((N, D))


@pytest.fixture(scope="module")
def new_points():
    return np.random.default_rng(12).random((9, D))


def _estimator(**kw):
    base = {"n_neighbors": K, "kernel": rg.Matern52(lengthscale=0.15), "inducing": M, "seed": 3, "backend": "cpu"}
    return ResidualNeighbors(**{**base, **kw})


@pytest.fixture(scope="module", params=["brute", "tree"])
def fitted(request, coords):
    """(a fitted estimator, the ResidualIndex the same problem gives)"""
    est = _estimator(method=request.param).fit(coords)
    prob = rg.ResidualProblem(coords, kernel=rg.Matern52(lengthscale=0.15), inducing=M, seed=3)
    return est, rg.ResidualIndex(prob, backend="cpu", method=request.param)


def test_import_residual_gpu_does_not_import_sklearn():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    code = ("import sys, residual_gpu; assert 'sklearn' not in sys.modules, 'sklearn imported'; "
            "residual_gpu.ResidualNeighbors; assert 'sklearn' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    assert rg.ResidualNeighbors is ResidualNeighbors


def test_params_stored_verbatim_without_validation():
    kern, ind = rg.RBF(0.3), np.zeros((4, D))
    est = ResidualNeighbors(n_neighbors="many", kernel=kern, inducing=ind, backend="nowhere", precision=None)
    params = est.get_params()
    assert sorted(params) == PARAMS
    assert params["n_neighbors"] == "many" and params["backend"] == "nowhere" and params["precision"] is None
    assert params["kernel"] is kern and params["inducing"] is ind
    with pytest.raises(InvalidTypeError, match="n_neighbors must be an integer, got 'many'"):
        est.fit(np.zeros((10, D)))


def test_set_params_and_clone(coords):
    est = _estimator()
    assert est.set_params(n_neighbors=3, lengthscale=None) is est and est.n_neighbors == 3
    with pytest.raises(ValueError, match="Invalid parameter"):
        est.set_params(leaf_size=8)
    est.fit(coords)
    twin = clone(est)
    assert twin is not est and twin.get_params() == est.get_params()
    assert twin.get_params()["kernel"] == est.kernel
    assert not hasattr(twin, "index_") and not hasattr(twin, "n_features_in_")
    with pytest.raises(NotFittedError):
        twin.kneighbors()
    assert "n_neighbors=3" in repr(est)


@pytest.mark.parametrize("call", ["kneighbors", "kneighbors_graph"])
def test_not_fitted(call, new_points):
    est = _estimator()
    with pytest.raises(NotFittedError, match="not fitted"):
        getattr(est, call)()
    with pytest.raises(NotFittedError):
        getattr(est, call)(new_points)


def test_fitted_attributes(fitted, coords):
    est, index = fitted
    assert est.n_features_in_ == D and est.n_samples_fit_ == N
    assert isinstance(est.problem_, rg.ResidualProblem) and isinstance(est.index_, rg.ResidualIndex)
    assert est.index_.backend == "cpu" and est.index_.method == index.method
    np.testing.assert_array_equal(est.problem_.v, index.problem.v)
    assert est.fit(coords) is est


def test_kneighbors_of_the_training_points_is_query(fitted):
    est, index = fitted
    want = index.query(K)
    dist, ind = est.kneighbors()
    np.testing.assert_array_equal(ind, want.indices)
    np.testing.assert_array_equal(dist, want.distances)
    assert not np.any(ind == np.arange(N)[:, None]), "a training point is its own neighbour"
    np.testing.assert_array_equal(est.kneighbors(return_distance=False), want.indices)
    wide = index.query(N - 1)
    np.testing.assert_array_equal(est.kneighbors(n_neighbors=N - 1)[1], wide.indices)


def test_kneighbors_of_new_points_is_query(fitted, new_points, coords):
    est, index = fitted
    want = index.query(4, query_coords=new_points)
    dist, ind = est.kneighbors(new_points, n_neighbors=4)
    np.testing.assert_array_equal(ind, want.indices)
    np.testing.assert_array_equal(dist, want.distances)
    # a location that is a training point finds it, as sklearn's kneighbors(X) does
    dist, ind = est.kneighbors(coords[[17]], n_neighbors=N)
    assert ind[0, 0] == 17 and dist[0, 0] <= 1e-7


@pytest.mark.parametrize("where", ["train", "new"])
def test_kneighbors_graph(fitted, new_points, where):
    est, index = fitted
    x = None if where == "train" else new_points
    want = index.query(K) if x is None else index.query(K, query_coords=x)
    dist_graph = est.kneighbors_graph(x, mode="distance")
    conn = est.kneighbors_graph(x)
    for g in (dist_graph, conn):
        assert isinstance(g, scipy.sparse.csr_matrix)  # sklearn's default sparse interface
        assert g.shape == (want.indices.shape[0], N) and g.nnz == want.indices.size
    assert (dist_graph != scipy.sparse.csr_matrix(want.to_csr())).nnz == 0
    np.testing.assert_array_equal(dist_graph.indices, conn.indices)
    np.testing.assert_array_equal(conn.data, np.ones(conn.nnz))
    # row r of the connectivity graph: exactly the k neighbours kneighbors returns
    dense = conn.toarray()
    rows = np.arange(dense.shape[0])[:, None]
    assert np.all(dense[rows, want.indices] == 1.0) and dense.sum() == want.indices.size


def test_kneighbors_graph_follows_sklearns_sparse_interface(fitted):
    est, _ = fitted
    if "sparse_interface" not in sklearn.get_config():
        pytest.skip(f"scikit-learn {sklearn.__version__} has no sparse_interface setting")
    with sklearn.config_context(sparse_interface="sparray"):
        assert isinstance(est.kneighbors_graph(), scipy.sparse.csr_array)


def test_kernel_by_name_and_parameters(coords):
    by_name = _estimator(kernel="matern32", lengthscale=0.2, variance=2.0).fit(coords)
    by_object = _estimator(kernel=rg.Matern32(lengthscale=0.2, variance=2.0)).fit(coords)
    for a, b in zip(by_name.kneighbors(), by_object.kneighbors()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InvalidArgumentError, match="either in the kernel object or separately"):
        _estimator(lengthscale=0.2).fit(coords)


def test_any_array_in(coords, new_points):
    jnp = pytest.importorskip("jax.numpy")
    x = coords.astype(np.float32)  # JAX in 32-bit mode holds float32: give numpy the same values
    want = _estimator().fit(x).kneighbors(new_points.astype(np.float32))
    got = _estimator().fit(jnp.asarray(x)).kneighbors(jnp.asarray(new_points.astype(np.float32)))
    for a, b in zip(got, want):
        assert type(a) is np.ndarray
        np.testing.assert_array_equal(a, b)


def test_bad_calls_name_the_argument(fitted, new_points):
    est, _ = fitted
    with pytest.raises(InvalidArgumentError, match=r"mode must be one of \['connectivity', 'distance'\], "
                                                   r"got mode='weights'"):
        est.kneighbors_graph(mode="weights")
    with pytest.raises(InvalidArgumentError, match=rf"n_neighbors must be in \[1, {N - 1}\], got n_neighbors={N}"):
        est.kneighbors(n_neighbors=N)
    with pytest.raises(InvalidArgumentError, match=rf"n_neighbors must be in \[1, {N}\], got n_neighbors=0"):
        est.kneighbors(new_points, n_neighbors=0)
    with pytest.raises(InvalidArgumentError, match=r"X must have 2 column\(s\), got X.shape=\(3, 5\)"):
        est.kneighbors(np.zeros((3, 5)))
    with pytest.raises(InvalidTypeError, match="X must be a 2-D array of real numbers"):
        _estimator().fit("points")
