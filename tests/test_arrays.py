"""Arrays of numpy, JAX, PyTorch and CuPy in (coords, inducing, factors, queries, lengthscales),
numpy results out, or results in the input's library with like=.

Every library must give the bits the same values give as numpy arrays. The data are float32
values (JAX without x64 holds float32), stored in each library's float64 where it has one.
Libraries that are not installed (or CuPy without a device) are skipped.
"""

from __future__ import annotations

import numpy as np
import pytest

import residual_gpu as rg
from residual_gpu.errors import InvalidArgumentError, InvalidTypeError

N, D, M, K = 240, 2, 16, 6


def _jax():
    jnp = pytest.importorskip("jax.numpy")
    return jnp.asarray, np.asarray


def _jax_x64():
    jax = pytest.importorskip("jax")

    def make(a):
        with jax.enable_x64(True):  # float64 arrays, kept outside the context
            return jax.numpy.asarray(a)

    return make, np.asarray


def _torch():
    torch = pytest.importorskip("torch")
    return torch.asarray, lambda t: t.numpy()


def _torch_grad():
    torch = pytest.importorskip("torch")

    def make(a):
        t = torch.asarray(a)
        return t.requires_grad_(True) if t.is_floating_point() else t

    return make, lambda t: t.detach().numpy()


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    return (lambda a: torch.asarray(a, device="cuda")), lambda t: t.cpu().numpy()


def _cupy():
    cp = pytest.importorskip("cupy")
    usable, reason = rg.available_backends()["cuda"]  # CuPy installed, but is there a device?
    if not usable:
        pytest.skip(reason)
    return cp.asarray, cp.asnumpy


LIBRARIES = {"jax": _jax, "jax_x64": _jax_x64, "torch": _torch, "torch_grad": _torch_grad, "torch_cuda": _torch_cuda, "cupy": _cupy}


@pytest.fixture(params=list(LIBRARIES), ids=list(LIBRARIES))
def lib(request):
    """(to the library, back to numpy) for one array library; skipped where it is absent."""
    return LIBRARIES[request.param]()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    x = rng.random((N, D)).astype(np.float32).astype(np.float64)
    u = x[rng.choice(N, M, replace=False)].copy()
    xq = rng.random((7, D)).astype(np.float32).astype(np.float64)
    return x, u, xq


def _kernel(lengthscale):
    return rg.Matern32(lengthscale=lengthscale, variance=1.5)


ARD = np.array([0.25, 0.5], dtype=np.float32).astype(np.float64)


def test_problem_from_library_arrays_is_bitwise_the_numpy_problem(lib, data):
    to_lib, _ = lib
    x, u, xq = data
    want = rg.ResidualProblem(x, kernel=_kernel(ARD), inducing=u)
    got = rg.ResidualProblem(to_lib(x), kernel=_kernel(to_lib(ARD)), inducing=to_lib(u))
    for name in ("coords", "inducing", "v", "p", "lengthscales"):
        a, b = getattr(want, name), getattr(got, name)
        assert type(b) is np.ndarray and b.dtype == np.float64, name
        np.testing.assert_array_equal(b, a, err_msg=name)
    wq, gq = want.factors_at(xq), got.factors_at(to_lib(xq))
    for a, b in zip(wq, gq):
        np.testing.assert_array_equal(b, a)


def test_scalar_lengthscale_and_variance_as_0d_arrays(lib, data):
    to_lib, _ = lib
    kern = rg.Matern52(lengthscale=to_lib(np.float32(0.25)), variance=to_lib(np.float32(2.0)))
    assert kern.lengthscale == 0.25 and kern.variance == 2.0
    assert isinstance(kern.lengthscale, float)


def test_queries_and_query_coords_from_a_library_give_the_numpy_bits(lib, data):
    to_lib, _ = lib
    x, u, xq = data
    prob = rg.ResidualProblem(x, kernel=_kernel(0.3), inducing=u)
    index = rg.ResidualIndex(prob, backend="cpu", method="brute")
    ids = np.array([3, 0, N - 1, 17, 17])
    for kw_np, kw_lib in (({"queries": ids}, {"queries": to_lib(ids)}),
                          ({"query_coords": xq}, {"query_coords": to_lib(xq)})):
        want, got = index.query(K, **kw_np), index.query(K, **kw_lib)
        assert type(got.indices) is np.ndarray and type(got.distances) is np.ndarray
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.distances, want.distances)


def test_from_factors_with_library_factors(lib, data):
    to_lib, back = lib
    x, u, _ = data
    built = rg.ResidualProblem(x, kernel=_kernel(0.3), inducing=u)
    vl, pl = to_lib(built.v), to_lib(built.p)  # JAX in 32-bit mode rounds them: compare with what it holds
    want = rg.ResidualProblem.from_factors(x, v=back(vl), p=back(pl), kernel=built.kernel, inducing=u)
    got = rg.ResidualProblem.from_factors(to_lib(x), v=vl, p=pl, kernel=built.kernel, inducing=to_lib(u))
    assert got.v.dtype == np.float64
    np.testing.assert_array_equal(got.v, want.v)
    np.testing.assert_array_equal(got.p, want.p)
    res = rg.ResidualIndex(got, backend="cpu").query(K, predecessor=True)
    ref = rg.ResidualIndex(want, backend="cpu").query(K, predecessor=True)
    np.testing.assert_array_equal(res.indices, ref.indices)
    np.testing.assert_array_equal(res.distances, ref.distances)


def test_library_inputs_are_not_modified(lib, data):
    to_lib, back = lib
    x, u, xq = data
    xl, ul, ql = to_lib(x), to_lib(u), to_lib(xq)
    prob = rg.ResidualProblem(xl, kernel=_kernel(0.3), inducing=ul)
    rg.ResidualIndex(prob, backend="cpu").query(K, query_coords=ql)
    # the problem keeps copies of its own: writing one cannot reach the caller's array
    assert not prob.coords.flags.writeable
    for arr, want in ((xl, x), (ul, u), (ql, xq)):
        np.testing.assert_array_equal(back(arr), want)


def test_results_like_the_input(lib, data):
    to_lib, back = lib
    x, u, xq = data
    prob = rg.ResidualProblem(x, kernel=_kernel(0.3), inducing=u)
    index = rg.ResidualIndex(prob, backend="cpu")
    like = to_lib(xq)
    want = index.query(K, query_coords=xq)
    try:
        got = index.query(K, query_coords=like, like=like)
    except InvalidArgumentError as exc:  # JAX in 32-bit mode: refused, not rounded
        assert "jax_enable_x64" in str(exc) and "int64" in str(exc)
        jax = pytest.importorskip("jax")
        with jax.enable_x64(True):
            got = index.query(K, query_coords=like, like=like)
    assert type(got.indices) is type(like) and type(got.distances) is type(like)
    for a in (got.indices, got.distances):
        assert str(getattr(a, "device", "")) == str(getattr(like, "device", ""))
    idx, dist = back(got.indices), back(got.distances)
    assert idx.dtype == np.int64 and dist.dtype == np.float64
    np.testing.assert_array_equal(idx, want.indices)
    np.testing.assert_array_equal(dist, want.distances)
    # the graph reads the library's arrays back
    assert (got.to_csr() != want.to_csr()).nnz == 0


def test_residual_knn_like_coords(lib, data):
    to_lib, back = lib
    x, u, _ = data
    want = rg.residual_knn(x, K, _kernel(0.3), inducing=u, predecessor=True, backend="cpu")
    xl = to_lib(x)
    try:
        got = rg.residual_knn(xl, K, _kernel(0.3), inducing=to_lib(u), predecessor=True, backend="cpu", like=xl)
    except InvalidArgumentError:
        jax = pytest.importorskip("jax")
        with jax.enable_x64(True):
            got = rg.residual_knn(xl, K, _kernel(0.3), inducing=to_lib(u), predecessor=True, backend="cpu", like=xl)
    for a, b in zip(got, want):
        assert type(a) is type(xl)
        np.testing.assert_array_equal(back(a), b)


def test_jax_in_32_bit_mode_refuses_to_round_results(data):
    jax = pytest.importorskip("jax")
    x, u, _ = data
    if jax.config.jax_enable_x64:
        pytest.skip("this process runs JAX with x64 enabled")
    index = rg.ResidualIndex(rg.ResidualProblem(x, kernel=_kernel(0.3), inducing=u), backend="cpu")
    with pytest.raises(InvalidArgumentError, match=r"like=.* int64 results into int32.*jax_enable_x64"):
        index.query(K, like=jax.numpy.zeros(1))


def test_like_numpy_or_none_is_numpy(data):
    x, u, _ = data
    index = rg.ResidualIndex(rg.ResidualProblem(x, kernel=_kernel(0.3), inducing=u), backend="cpu")
    a, b = index.query(K), index.query(K, like=np.zeros(1, dtype=np.float32))
    assert type(b.indices) is np.ndarray and b.indices.dtype == np.int64 and b.distances.dtype == np.float64
    np.testing.assert_array_equal(a.indices, b.indices)


@pytest.mark.parametrize("like", ["torch", [1.0, 2.0], 3.0])
def test_like_must_be_an_array(data, like):
    x, u, _ = data
    index = rg.ResidualIndex(rg.ResidualProblem(x, kernel=_kernel(0.3), inducing=u), backend="cpu")
    with pytest.raises(InvalidTypeError, match=r"like must be an array .* got like="):
        index.query(K, like=like)


def test_bad_library_arrays_get_typed_errors(lib, data):
    to_lib, _ = lib
    x, u, _ = data
    with pytest.raises(InvalidTypeError, match=r"coords must hold real numbers, got coords.dtype=bool"):
        rg.ResidualProblem(to_lib(x > 0.5), kernel=_kernel(0.3), inducing=4)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(InvalidArgumentError, match=r"coords must be finite, got coords\[3, 1\]=nan"):
        rg.ResidualProblem(to_lib(bad), kernel=_kernel(0.3), inducing=4)
    prob = rg.ResidualProblem(x, kernel=_kernel(0.3), inducing=u)
    with pytest.raises(InvalidArgumentError, match=r"queries must be in \[0, 240\), got queries\[1\]=240"):
        rg.ResidualIndex(prob, backend="cpu").query(K, queries=to_lib(np.array([0, N])))
    with pytest.raises(InvalidArgumentError, match=r"query_coords must have 2 column\(s\), got query_coords.shape"):
        rg.ResidualIndex(prob, backend="cpu").query(K, query_coords=to_lib(np.zeros((3, 3))))


def test_torch_dtype_numpy_lacks_is_a_typed_error(data):
    torch = pytest.importorskip("torch")
    x, _, _ = data
    with pytest.raises(InvalidTypeError, match=r"coords must be a 2-D array of real numbers, got Tensor\(shape="):
        rg.ResidualProblem(torch.asarray(x, dtype=torch.bfloat16), kernel=_kernel(0.3), inducing=4)


class _DLPackOnly:
    """An array that offers only the DLPack protocol (no __array__)."""

    def __init__(self, a):
        self._a = a
        self.shape, self.dtype = a.shape, a.dtype

    def __array_namespace__(self, api_version=None):
        return np

    def __dlpack__(self, **kw):
        return self._a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_dlpack_only_array_is_read(data):
    x, u, _ = data
    want = rg.ResidualProblem(x, kernel=_kernel(0.3), inducing=u)
    got = rg.ResidualProblem(_DLPackOnly(x), kernel=_kernel(0.3), inducing=_DLPackOnly(u))
    np.testing.assert_array_equal(got.v, want.v)
