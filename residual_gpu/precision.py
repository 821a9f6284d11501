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


def candidate_maxima(v_norms, p) -> tuple[float, float]:
    """(max_j ||V_j|| / sqrt(p_j), max_j 1 / sqrt(p_j)) over some candidates: what query_margins
    and float32_margins take as cand_w_max and cand_ip_max (0, 0 for no candidate)."""
    ip = 1.0 / np.sqrt(np.asarray(p, dtype=np.float64))
    return float(np.max(np.asarray(v_norms) * ip, initial=0.0)), float(np.max(ip, initial=0.0))


def query_margins(q_vnorm, q_p, cand_w_max: float, cand_ip_max: float, m: int, d: int,
                  variance: float, dtype=np.float64) -> np.ndarray:
    """E_i for each query (see module docstring); cand_* are maxima over the candidates."""
    ip_q = 1.0 / np.sqrt(q_p)
    e = gamma(m, dtype) * (q_vnorm * ip_q) * cand_w_max + kernel_error(d, dtype) * variance * ip_q * cand_ip_max
    return SAFETY * e + 32.0 * UNIT_ROUNDOFF[np.dtype(dtype)]


def accurate_rho_error(q_vnorm, c_vnorm, q_p, c_p, m: int, d: int, variance: float) -> np.ndarray:
    """Bound on |rho_accurate - rho_exact| for every (query, candidate) pair, shape (q, c), for
    an accurate evaluation of the reference formula in any order of the kernel's exp: the
    engines' (Dot2 with portable_exp) or the numpy reference's (Dot2 with numpy's exp), on any
    CPU, GPU or XLA exp (docs/precision.md, "How far two exact engines may differ"):

        ( kappa_d variance + 2 u (variance + ||V_i|| ||V_j||) + gamma_m^2 ||V_i|| ||V_j|| ) / sqrt(p_i p_j) + 4 u

    - kappa_d variance: the kernel value (a few ulp of exp/sqrt, r^2's rounding amplified);
    - 2 u (variance + |s|) + gamma_m^2 sum_t |V_it V_jt|: Dot2's error (Ogita, Rump & Oishi,
      2005: u |s| + gamma_m^2 sum |x_t y_t|) and the two subtractions k - s_hi - s_lo, with
      |s| and the sum bounded by ||V_i|| ||V_j|| (Cauchy-Schwarz);
    - 4 u: the product p_i p_j, its square root, the division (relative, |rho| <= 1 after the clamp).
    """
    u = UNIT_ROUNDOFF[np.dtype(np.float64)]
    g = gamma(m)
    vv = np.multiply.outer(np.asarray(q_vnorm, dtype=np.float64), np.asarray(c_vnorm, dtype=np.float64))
    num = kernel_error(d) * variance + 2.0 * u * (variance + vv) + g * g * vv
    return num / np.sqrt(np.multiply.outer(np.asarray(q_p, dtype=np.float64), np.asarray(c_p, dtype=np.float64))) + 4.0 * u


def distance_tolerance(d_ref, rho_error) -> np.ndarray:
    """Largest |d_engine - d_ref| two accurate evaluations may show, given the reference distance
    d_ref and the bound rho_error on each side's |rho| error (accurate_rho_error; pass the sum of
    both sides'). d = sqrt(1 - a): with |a' - a| <= E, d'^2 lies in [d^2 - E, d^2 + E] (plus the
    rounding of 1 - a, 2 u), so d' lies between the square roots of those ends; 4 u more covers
    the rounding of either square root. Exact where E is tiny (|delta d| ~ E / 2d) and where d ~ 0
    (|delta d| <= sqrt(E)), unlike the first-order E / 2d."""
    u = UNIT_ROUNDOFF[np.dtype(np.float64)]
    d = np.asarray(d_ref, dtype=np.float64)
    e = np.asarray(rho_error, dtype=np.float64) + 2.0 * u
    d2 = d * d
    below = d - np.sqrt(np.maximum(d2 - e, 0.0))
    above = np.sqrt(np.minimum(d2 + e, 1.0)) - d
    return np.maximum(below, above) * (1.0 + 8.0 * u) + 4.0 * u


#: the fast pass's precisions (``ResidualIndex(precision=...)``)
PRECISIONS = ("auto", "float64", "float32")
#: precision="auto" picks float32 when this quantile of the points' float32 margins (as queries,
#: against the points with ordinary p) is below FLOAT32_MAX_MARGIN; queries whose own float32
#: margin exceeds it take the float64 pass, so certification can still separate the k-th
#: neighbour from what was dropped (docs/precision.md, "The float32 fast pass")
FLOAT32_QUANTILE = 0.9
FLOAT32_MAX_MARGIN = 1e-2
#: brute force's float32 pass leaves the points with p < TINY_P_RATIO * median(p) (the inducing
#: points and their neighbours) to float64: their 1/sqrt(p) would widen every query's float32
#: margin. Measured on vif (brute force, predecessor mode): 1/64 (the tree's dense-set ratio)
#: leaves the median margin at ~1.1e-3 and 2.3% (n = 32768) to 9.7% (n = 8192) of the queries
#: fail certification once; 1/8 gives ~4e-4 and 1.1% to 4.5%, for a float64 share of 3% to 8%
#: of the candidates, and was the fastest of 1/64, 1/16, 1/8, 1/4, 1/2 at n = 8192.
TINY_P_RATIO = 1.0 / 8.0
#: precision="auto" keeps float64 when more than this share of the points has tiny p: the
#: float64 share of the pass then costs more than float32 saves (smoke: 512 inducing points
#: of 2048 data points)
FLOAT32_MAX_TINY_SHARE = 0.15


def float32_margins(q_vnorm, q_p, cand_w_max: float, cand_ip_max: float, m: int, d: int,
                    variance: float) -> np.ndarray:
    """What a float32 fast pass adds to query_margins: the dot product's rounding in single
    precision over m + 2 terms (the products' inputs are rounded to float32 too) and the float32
    correlation (kernel_error in float32's u); cand_* are maxima over the float32 candidates."""
    return query_margins(q_vnorm, q_p, cand_w_max, cand_ip_max, m + 2, d, variance, dtype=np.float32)


def tiny_p_cut(p) -> float:
    """Residual variances below this are tiny (TINY_P_RATIO of the median)."""
    return float(np.median(p)) * TINY_P_RATIO if np.size(p) else 0.0


def choose_precision(v_norms, p, m: int, d: int, variance: float) -> tuple[str, str]:
    """The documented precision="auto" rule: (precision, reason)."""
    ordinary = p >= tiny_p_cut(p)
    tiny_share = 1.0 - float(np.mean(ordinary)) if np.size(p) else 1.0
    if tiny_share > FLOAT32_MAX_TINY_SHARE:
        return "float64", (f"{tiny_share:.0%} of the points have tiny p (> {FLOAT32_MAX_TINY_SHARE:.0%} would take "
                           "the float64 share of a float32 pass): float64")
    # as queries and as candidates, the points with ordinary p (tiny-p queries take the float64
    # pass whatever the precision)
    vn, po = v_norms[ordinary], p[ordinary]
    e32 = float32_margins(vn, po, *candidate_maxima(vn, po), m, d, variance)
    typical = float(np.quantile(e32, FLOAT32_QUANTILE))
    if typical < FLOAT32_MAX_MARGIN:
        return "float32", (f"float32 margin {typical:.3g} at the {FLOAT32_QUANTILE:g} quantile < "
                           f"{FLOAT32_MAX_MARGIN:g}: float32")
    return "float64", (f"float32 margin {typical:.3g} at the {FLOAT32_QUANTILE:g} quantile >= "
                       f"{FLOAT32_MAX_MARGIN:g} (median p = {float(np.median(p)):.3g}): float64")
