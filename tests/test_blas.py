"""_blas.solve_transposed: BLAS's trsm and trmm split over Numba's threads.

Its rows need not have the bits of one scipy call (trsm rounds by its blocking, which depends on
the rows per call): the tree's bound uses the computed residual ||v - T^T a||, so any solve to
working accuracy is covered. What is checked: a solves T^T a = v to that accuracy, back is T^T a,
and the input is not modified."""

import numba
import numpy as np
import pytest
import scipy.linalg

from residual_gpu._blas import single_blas_thread, solve_transposed
from residual_gpu._numba_math import residual_norms, row_norms


def _scipy_solve(t, v):
    """a = T^-T v row by row, by one scipy call (the path solve_transposed replaced)."""
    return scipy.linalg.solve_triangular(t, v.T, lower=True, trans="T", check_finite=False).T


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 17, 256])
@pytest.mark.parametrize("m", [1, 5, 64])
def test_solve_transposed_solves(rows, m):
    rng = np.random.default_rng(rows * 100 + m)
    g = rng.standard_normal((m, m))
    t = np.linalg.cholesky(g @ g.T + m * np.eye(m))  # cond(T) < 10
    v = rng.standard_normal((rows, m))
    v_before = v.copy()
    with single_blas_thread():
        want_a = _scipy_solve(t, v)
    for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
        numba.set_num_threads(threads)
        try:
            a, back = solve_transposed(t, v)
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        assert a.shape == back.shape == v.shape
        # a few ulps of the largest entry each (|a|, |v| < 10 here): any backward-stable solve
        np.testing.assert_allclose(a, want_a, rtol=0, atol=1e-13)
        np.testing.assert_allclose(back, a @ t, rtol=0, atol=1e-13)
        np.testing.assert_allclose(back, v, rtol=0, atol=1e-13)
    np.testing.assert_array_equal(v, v_before)


def test_residual_norms_are_row_norms_of_the_difference():
    rng = np.random.default_rng(3)
    v = rng.standard_normal((40, 33))
    w = v + 1e-9 * rng.standard_normal(v.shape)
    np.testing.assert_array_equal(residual_norms(v, w), row_norms(v - w))
