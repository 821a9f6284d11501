"""The rounding margins that make the fast path exact, checked against the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import KERNEL_CLASSES
from numba import njit
from numba.core.registry import CPUDispatcher as Dispatcher

import residual_gpu as rg
from residual_gpu._numba_math import (
    correlation,
    exp32_nonpositive_inplace,
    exp_nonpositive_inplace,
    portable_exp,
    scaled_sq_distance,
)
from residual_gpu.backends.cpu import _dense_tile
from residual_gpu.kernels import KERNEL_IDS
from residual_gpu.precision import UNIT_ROUNDOFF, kernel_error, query_margins
from residual_gpu.reference import residual_rho_block


@njit(fastmath=False)
def portable_exp_py(x):
    return portable_exp(x)


@njit(fastmath=False)
def _accurate_covariance(x1, x2, scale, kernel_id, variance):
    out = np.empty((x1.shape[0], x2.shape[0]))
    for i in range(x1.shape[0]):
        for j in range(x2.shape[0]):
            out[i, j] = variance * correlation(kernel_id, scaled_sq_distance(x1[i], x2[j], scale))
    return out


def test_polynomial_exp_within_3_ulp_of_libm():
    rng = np.random.default_rng(0)
    z = np.concatenate([-rng.random(200_000) * 60, -rng.random(1000) * 1e-12, [0.0, -700.0, -707.9]])
    out = z.copy()
    exp_nonpositive_inplace(out, np.empty_like(z))
    ulp = np.spacing(np.exp(z))
    assert np.max(np.abs(out - np.exp(z)) / ulp) <= 3.0
    far = np.array([-708.0, -750.0, -1e6])
    exp_nonpositive_inplace(far, np.empty(3))
    assert np.all(far == far[0]) and 0 < far[0] < 1e-307  # clamped, never 0 or nan


def test_portable_exp_within_its_bound():
    """The accurate path's exp (docs/precision.md, "The accurate path's exp"): relative error
    below 3 u against the exact value; libm's own error is at most 1 u here (glibc: < 0.51 ulp),
    so the two differ by less than 4 u. Special values as documented."""
    rng = np.random.default_rng(2)
    x = np.concatenate([-rng.random(200_000) * 708, rng.random(20_000) * 709, -rng.random(1000) * 1e-12,
                        np.arange(-708, 709, 0.34657359027997264), [0.0, -708.0, 709.0, 5e-324, -5e-324]])
    got = np.array([portable_exp_py(t) for t in x])
    want = np.array([math.exp(t) for t in x])
    rel = np.abs(got - want) / want / UNIT_ROUNDOFF[np.dtype(np.float64)]
    assert np.max(rel) < 4.0
    assert np.count_nonzero(got != want) > 0  # it is not libm's exp in disguise
    assert portable_exp_py(0.0) == 1.0
    assert portable_exp_py(-708.01) == 0.0 and portable_exp_py(-math.inf) == 0.0
    assert portable_exp_py(709.01) == math.inf
    assert math.isnan(portable_exp_py(math.nan))


def test_numba_functions_state_their_fastmath_flags():
    """Numba compiles a function that does not state ``fastmath`` with the flags of its first
    caller, so one called from a ``fastmath={"contract"}`` function gets FMAs contracted in on
    FMA targets only: the accurate path would depend on the CPU (_numba_math's docstring)."""
    import importlib
    import pkgutil

    silent = []
    modules = []
    for info in pkgutil.walk_packages(rg.__path__, prefix="residual_gpu."):
        try:
            modules.append(importlib.import_module(info.name))
        except ImportError:  # an optional extra that is not installed here
            continue
    assert {"residual_gpu.brute", "residual_gpu.backends.cpu", "residual_gpu.certify"} <= {m.__name__ for m in modules}
    for module in modules:
        for name, obj in vars(module).items():
            if isinstance(obj, Dispatcher) and obj.__module__ == module.__name__:
                opts = obj.targetoptions
                if opts.get("inline") != "always" and "fastmath" not in opts:
                    silent.append(f"{module.__name__}.{name}")
    assert not silent, f"state fastmath=False (or the flags wanted) on {silent}"


@pytest.mark.parametrize("kernel", ["rbf", "matern12", "matern32", "matern52"])
@pytest.mark.parametrize("d", [1, 3, 8])
def test_accurate_kernel_values_are_the_oracles_bit_for_bit(kernel, d):
    """The accurate path's k(x, y) (portable_exp, fixed-order r^2, no contraction) equals the
    Rust oracle's everywhere: the parity preset needs no last-bit luck from libm or the CPU."""
    oracle = pytest.importorskip("residual_gpu_ref")
    rng = np.random.default_rng(d)
    x1, x2 = rng.random((200, d)) * 3, rng.random((300, d)) * 3
    ls = rng.uniform(0.05, 2.0, d)
    ours = _accurate_covariance(x1, x2, ls, KERNEL_IDS[kernel], 1.3)
    theirs = oracle.covariance_block(x1, x2, kernel=kernel, lengthscale=ls, variance=1.3)
    np.testing.assert_array_equal(ours, theirs)


def test_float32_polynomial_exp_within_its_bound():
    """The float32 exp of the float32 leaf blocks: relative error <= 32 u (float32's u), the
    bound docs/precision.md derives; below -87 it returns exp(-87), a normal float32."""
    rng = np.random.default_rng(1)
    z = np.concatenate([-rng.random(1 << 20) * 87, -rng.random(1000) * 1e-6, -np.arange(0, 87, 0.3466),
                        [0.0, -87.0]]).astype(np.float32)
    out = z.copy()
    exp32_nonpositive_inplace(out, np.empty_like(z))
    exact = np.exp(z.astype(np.float64))
    rel = np.abs(out - exact) / exact / UNIT_ROUNDOFF[np.dtype(np.float32)]
    assert np.max(rel) <= 32.0
    assert np.max(rel) > 0.1  # float32 rounding is really there
    far = np.array([-87.5, -200.0, -3e38], dtype=np.float32)
    exp32_nonpositive_inplace(far, np.empty_like(far))
    assert np.all(far == far[0]) and abs(far[0] / np.exp(-87.0) - 1) < 1e-6


@pytest.mark.parametrize("kernel", KERNEL_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("d", [1, 2, 3, 8])
def test_float32_kernel_values_within_kernel_error(kernel, d):
    """With float32 products (the tree's float32 leaves) the CPU transform evaluates the
    correlation in float32: within kernel_error(d, float32) * variance of the float64 one,
    from coincident points to far beyond the lengthscale."""
    rng = np.random.default_rng(d)
    x = np.concatenate([rng.random((600, d)), [np.full(d, 1e6), np.full(d, 1e17), np.full(d, 1e25)]])
    qx = np.concatenate([x[:5], rng.random((25, d))])  # the last three x are 1e7 to 1e26 lengthscales away
    kern = kernel(lengthscale=0.1, variance=0.9)  # variance < 1: no value reaches the clamp at 1
    args = (kern.kernel_id, kern.variance, qx, np.full(d, 1.0 / 0.1), np.ones(qx.shape[0]),
            np.ascontiguousarray(x.T), np.ones(x.shape[0]))
    zeros = np.zeros((qx.shape[0], x.shape[0]))
    v64 = _dense_tile(*args, zeros)
    v32 = _dense_tile(*args, zeros.astype(np.float32))
    err = np.abs(v32 - v64)
    # the float64 values are within kernel_error(d) * variance of the exact ones
    assert np.max(err) <= (kernel_error(d, np.float32) - kernel_error(d)) * kern.variance
    assert np.max(err) > 1e-9  # the float32 path really ran
    assert np.min(v64) < 1e-3 and np.max(v64) == pytest.approx(kern.variance)


def _gold_like(seed):
    x = np.random.default_rng(seed).normal(size=(300, 3))
    u = x[np.sort(np.random.default_rng(seed).choice(300, 150, replace=False))]
    return rg.ResidualProblem(x, kernel=rg.RBF(lengthscale=1.0), inducing=u)


@pytest.mark.parametrize("kernel", KERNEL_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("tiny_p", [False, True], ids=["moderate-p", "tiny-p"])
def test_fast_values_within_margin(kernel, tiny_p):
    if tiny_p:
        prob = _gold_like(1)
        prob = rg.ResidualProblem.from_factors(prob.coords, v=prob.v, p=prob.p,
                                               kernel=kernel(lengthscale=1.0), inducing=prob.inducing)
    else:
        x = np.random.default_rng(2).random((300, 3)) * 1000.0  # far from the origin
        prob = rg.ResidualProblem(x, kernel=kernel(lengthscale=np.array([80.0, 120.0, 100.0])), inducing=40)
    index = rg.ResidualIndex(prob, backend="cpu")
    rows = np.arange(prob.n)
    batch = index._batch(rows, None, False)
    fast = index._backend.abs_rho_tile(index._prepared, batch, rows)
    exact = np.abs(residual_rho_block(prob.coords, prob.v, prob.p, prob.coords, prob.v, prob.p, prob.kernel))
    ip = 1.0 / np.sqrt(prob.p)
    margin = query_margins(prob.v_norms, prob.p, np.max(prob.v_norms * ip), np.max(ip), prob.m, prob.d,
                           prob.kernel.variance)
    err = np.abs(fast - exact)
    assert np.all(err <= margin[:, None]), np.max(err / margin[:, None])
    # the margin is a bound, not a guess: it is not absurdly loose either (the inducing
    # points themselves have p ~ jitter, which sets max_j 1/sqrt(p_j) for everyone)
    assert np.median(margin) < (1e-6 if tiny_p else 1e-10)
    assert margin.min() >= 32 * UNIT_ROUNDOFF[np.dtype(np.float64)]
