"""The JAX backend: same exact results as backend="cpu" and the float64 reference.

Skipped when JAX is not importable. JAX compiles once per shape, so the tests share a few
problem shapes (one problem per kernel case, every query kind on it) to stay fast.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed (pip install 'residual-gpu[jax]')")

from conftest import CASE_IDS, CASES, assert_select_matches_cpu, check_knn, fast_value_tolerance, make_problem

import residual_gpu as rg
import residual_gpu.backends.jax as jax_backend
from residual_gpu import search
from residual_gpu.backends import get_backend

BACKEND = "jax"


def check(problem, k, **kwargs):
    """Results through this backend equal the reference and backend "cpu"."""
    return check_knn(problem, k, backend=BACKEND, **kwargs)


@pytest.mark.parametrize("d,kernel,ls,m", CASES, ids=CASE_IDS)
def test_every_query_kind(d, kernel, ls, m):
    """All points (plain, predecessor), indices with repeats, new locations: one problem per case."""
    problem = make_problem(1, 180, d, kernel(lengthscale=ls, variance=1.7), m)
    for k in (1, 7, 40):
        check(problem, k)
        check(problem, k, predecessor=True)
    queries = np.random.default_rng(11).integers(0, 180, 40)
    check(problem, 9, queries=queries)
    res = check(problem, 9, queries=queries, predecessor=True)
    small = queries < 9
    assert np.all((res.indices[small] >= 0).sum(axis=1) == queries[small])
    xnew = np.random.default_rng(21).random((30, d))
    xnew[:3] = problem.coords[:3]
    check(problem, 11, query_coords=xnew)
    check(problem, 180, query_coords=xnew)  # every point


def test_tiling_boundaries(monkeypatch):
    """Small query and candidate tiles: padding, masking and the loop over tiles are crossed."""
    monkeypatch.setattr(jax_backend, "QUERY_TILE", 8)
    monkeypatch.setattr(jax_backend, "SMALL_QUERY_TILE", 4)
    monkeypatch.setattr(jax_backend, "CANDIDATE_TILE", 16)
    monkeypatch.setattr(search, "QUERY_CHUNK", 19)
    problem = make_problem(6, 130, 2, rg.Matern32(lengthscale=0.15), 14, duplicates=10)
    check(problem, 6)
    check(problem, 6, predecessor=True)
    check(problem, 6, queries=np.array([129, 0, 5, 5, 77]))


@pytest.mark.parametrize("predecessor", [False, True], ids=["plain", "pred"])
def test_select_candidates_matches_cpu(predecessor):
    assert_select_matches_cpu(make_problem(8, 150, 3, rg.Matern52(lengthscale=0.3), 20), BACKEND, predecessor)


@pytest.mark.parametrize("tiny_p", [False, True], ids=["moderate-p", "tiny-p"])
def test_abs_rho_tile_matches_cpu(tiny_p):
    if tiny_p:
        x = np.random.default_rng(42).normal(size=(300, 3))
        problem = rg.ResidualProblem(x, kernel=rg.RBF(lengthscale=1.0), inducing=x[::2])
    else:  # inducing points off the data: every p is a sizeable share of the variance
        x = np.random.default_rng(9).random((300, 3))
        u = np.random.default_rng(10).random((20, 3))
        problem = rg.ResidualProblem(x, kernel=rg.Matern52(lengthscale=0.3, variance=1.3), inducing=u)
    index = rg.ResidualIndex(problem, backend="cpu")
    batch = index._batch(np.arange(0, 300, 7), None, False)
    cols = np.random.default_rng(1).permutation(300)[:111]
    out = []
    for name in ("cpu", BACKEND):
        backend = get_backend(name)
        out.append(backend.abs_rho_tile(backend.prepare(problem), batch, cols))
    cpu, fast = out
    assert fast.shape == (batch.size, cols.size) and fast.dtype == np.float64
    assert np.all((fast >= 0) & (fast <= 1))
    # both fast paths lie within their certification margin of the exact value
    assert np.all(np.abs(fast - cpu) <= fast_value_tolerance(problem, batch))
    backend = get_backend(BACKEND)
    assert backend.abs_rho_tile(backend.prepare(problem), batch, np.array([], dtype=np.int64)).shape == (batch.size, 0)


def test_availability_names_jax_and_device():
    usable, reason = jax_backend.JaxBackend.availability()
    assert usable
    assert "JAX" in reason and str(jax.devices()[0]) in reason
    assert rg.available_backends()["jax"] == (usable, reason)
    index = rg.ResidualIndex(make_problem(0, 50, 2, rg.RBF(lengthscale=0.3), 5), backend="jax")
    assert index.backend == "jax"


def test_x64_flag_of_the_caller_is_left_alone():
    before = bool(jax.config.jax_enable_x64)
    check(make_problem(2, 64, 2, rg.Matern12(lengthscale=0.2), 8), 5)
    assert bool(jax.config.jax_enable_x64) == before


def test_importing_residual_gpu_imports_no_jax_or_cupy():
    code = ("import sys, residual_gpu as rg; rg.available_backends; "
            "assert 'jax' not in sys.modules and 'cupy' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
