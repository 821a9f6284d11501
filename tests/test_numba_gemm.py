"""The leaf blocks' small product (residual_gpu._numba_gemm.gemm_nt) against float64 products.

Its error bound is the one docs/precision.md uses for the fast values (gamma_(K+2) |a| . |b| per
entry, any summation order); every remainder pair of its 4 x 3 blocking (rows mod 4, columns
mod 3) is covered, with K = 0 (no inducing points) apart.
"""

from __future__ import annotations

import numpy as np
import pytest

from residual_gpu._numba_gemm import gemm_nt


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows, cols, k", [
    (8, 6, 5), (128, 64, 33), (12, 5, 7),  # rows mod 4 = 0; columns mod 3 = 0, 1, 2
    (9, 63, 512), (1, 1, 1), (5, 11, 3),  # rows mod 4 = 1
    (10, 9, 6), (10, 7, 8), (6, 8, 40),  # rows mod 4 = 2
    (7, 3, 9), (11, 4, 2), (3, 5, 7),  # rows mod 4 = 3
    (4, 4, 16), (5, 2, 0),
])
def test_gemm_nt_within_the_dot_product_bound(dtype, rows, cols, k):
    rng = np.random.default_rng(rows * 1000 + cols * 10 + k)
    a = rng.standard_normal((rows, k)).astype(dtype)
    b = rng.standard_normal((cols + 3, k)).astype(dtype)[:cols]  # rows of a larger array, as a leaf's
    out = np.full((rows, cols + 2), np.nan, dtype=dtype)  # wider than the block, as a buffer is
    a_copy, b_copy = a.copy(), b.copy()
    assert gemm_nt(a, b, out) is out
    # the reference in a wider type than the product under test (float32: float64; float64: the
    # x87 long double), so its own rounding stays far below the 2u the bound leaves spare
    wide = np.float64 if dtype == np.float32 else np.longdouble
    if np.finfo(wide).eps >= np.finfo(dtype).eps:
        pytest.skip("no floating type wider than float64 on this platform")
    exact = a.astype(wide) @ b.astype(wide).T
    u = np.finfo(dtype).eps / 2
    gamma = (k + 2) * u / (1 - (k + 2) * u)
    bound = gamma * (np.abs(a).astype(wide) @ np.abs(b).astype(wide).T)
    assert np.all(np.abs(out[:, :cols].astype(wide) - exact) <= bound)
    assert np.isnan(out[:, cols:]).all()  # columns past the block untouched
    np.testing.assert_array_equal(a, a_copy)
    np.testing.assert_array_equal(b, b_copy)
