"""Certified rounding-error margins for the fast (BLAS) float64 path.

The fast path computes a_ij = |k(x_i, x_j) - V_i.V_j| / sqrt(p_i p_j) with an ordinary GEMM.
The exact answer is defined by the reference formula (Dot2 for V_i.V_j, see reference.py).
For every query we bound |a_fast - a_exact| + |a_accurate - a_exact| by one number E_i,
so that candidates whose fast values are more than 2 E_i apart are ranked correctly
without recomputation (docs/precision.md gives the derivation):

    E_i = SAFETY * ( gamma_m * ||V_i|| / sqrt(p_i) * max_j ||V_j|| / sqrt(p_j)
                     + kappa_d * variance / sqrt(p_i) * max_j 1 / sqrt(p_j) ) + 32 u

- gamma_m = (m + 2) u / (1 - (m + 2) u) bounds any summation order of an m-term dot
  product (with or without FMA): |fl(x.y) - x.y| <= gamma_m sum_t |x_t y_t|.
- kappa_d = (4 d + 64) u bounds, relative to the variance, the error of evaluating
  variance * g(r^2) from direct coordinate differences (the exp/sqrt of libm or numpy
  are within a few ulp; z exp(-z) <= 1/e keeps the amplification of r^2 errors bounded).
  With dtype float32 (the tree's float32 leaf blocks: float32 products and a float32
  kernel from a float64 r^2) every u above is float32's.
- 32 u covers the subtraction, the scaling by 1/sqrt(p_i p_j) and the clamp at 1 while
  a <= 2 (beyond that both values clamp to 1).
"""

from __future__ import annotations

import numpy as np

UNIT_ROUNDOFF = {np.dtype(np.float64): 2.0**-53, np.dtype(np.float32): 2.0**-24}
SAFETY = 1.25


def gamma(m: int, dtype=np.float64) -> float:
    """gamma_(m+2) = (m + 2) u / (1 - (m + 2) u) for the dtype's unit roundoff u."""
    u = UNIT_ROUNDOFF[np.dtype(dtype)]
    nu = (m + 2) * u
    return nu / (1.0 - nu)


def kernel_error(d: int, dtype=np.float64) -> float:
    """Bound on |fl(g(r^2)) - g(r^2)|, for g of any supported family, evaluated in float64,
    or in float32 from a float64 r^2 (the tree's float32 leaf blocks; docs/precision.md)."""
    return (4 * d + 64) * UNIT_ROUNDOFF[np.dtype(dtype)]


def query_margins(q_vnorm, q_p, cand_w_max: float, cand_ip_max: float, m: int, d: int,
                  variance: float, dtype=np.float64) -> np.ndarray:
    """E_i for each query (see module docstring); cand_* are maxima over the candidates."""
    ip_q = 1.0 / np.sqrt(q_p)
    e = gamma(m, dtype) * (q_vnorm * ip_q) * cand_w_max + kernel_error(d, dtype) * variance * ip_q * cand_ip_max
    return SAFETY * e + 32.0 * UNIT_ROUNDOFF[np.dtype(dtype)]
