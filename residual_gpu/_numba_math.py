"""Scalar float64 building blocks shared by the Numba code paths.

- ``correlation``: g(r^2) for each kernel family, by the integer ids of ``kernels.KERNEL_IDS``,
  with ``portable_exp``: the accurate path's kernel value, the same bits on every CPU and in
  the Rust oracle.
- ``two_sum`` / ``two_prod`` / ``dot2``: error-free transformations and the compensated dot
  product Dot2 of Ogita, Rump and Oishi (2005). Dot2 returns the dot product as if it had
  been accumulated in twice the working precision, then split into hi + lo; we need it
  where p is tiny and k_ij - V_i.V_j cancels almost completely.
  two_prod takes the product's rounding error from a fused multiply-add (an LLVM
  intrinsic: exact on every target, a hardware instruction where the CPU has FMA).

Flags: every Numba function of the package that is not ``inline="always"`` states ``fastmath``
explicitly. Numba compiles a callee that does not with the flags of the first caller that
compiles it, so a ``fastmath={"contract"}`` caller would let LLVM fuse the accurate path's
multiply-adds into FMAs on FMA targets only (tests/test_precision.py checks the rule). An
``inline="always"`` function takes its caller's flags: the accurate helpers here are inlined
only into ``fastmath=False`` functions.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

_SQRT3 = math.sqrt(3.0)
_SQRT5 = math.sqrt(5.0)


_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # fdlibm's split of ln 2: n * _LN2_HI is exact for |n| < 2**11
_LN2_LO = 1.90821492927058770002e-10
_ROUND_SHIFT = 6755399441055744.0  # 1.5 * 2**52: adding it rounds to an integer kept in the low bits
#: 1/i! for the degree-13 Taylor polynomial of exp on |r| <= ln2/2 (each a correctly rounded quotient)
_EXP_COEF = tuple(1.0 / math.factorial(i) for i in range(14))
_E0, _E1, _E2, _E3, _E4, _E5, _E6, _E7, _E8, _E9, _E10, _E11, _E12, _E13 = _EXP_COEF
#: below it portable_exp returns 0 (exp(-708) ~ 3.3e-308: an absolute error far below any margin)
_EXP_MIN = -708.0
#: above it portable_exp returns inf (the kernels only take arguments <= 0)
_EXP_MAX = 709.0


@njit(inline="always", cache=True)
def portable_exp(x):
    """exp(x) from IEEE +, -, * and an exact scaling by 2^n in one fixed order, so that it returns the same
    bits on every CPU, under any Numba target, and in the Rust oracle (rust_ref/src/kernels.rs,
    ``portable_exp``, written the same way) -- unlike libm's exp, numpy's SIMD-dispatched one
    or SVML. Cody-Waite reduction x = n ln2 + r, degree-13 Taylor polynomial by Horner's rule
    without FMA, 2^n exactly. Relative error below 3 u (u = 2^-53; docs/precision.md derives it);
    0 below -708, inf above 709, nan for nan. Callers must not run under fastmath (an FMA
    contracted into Horner's rule would change the bits on FMA targets only)."""
    if math.isnan(x):
        return x
    if x < _EXP_MIN:
        return 0.0
    if x > _EXP_MAX:
        return math.inf
    t, r = _exp_reduce(x)
    return _exp_taylor(r) * _pow2(np.int64(t - _ROUND_SHIFT))


@njit(inline="always", cache=True)
def _exp_reduce(x):
    """(t, r) with x = n ln2 + r, |r| <= ln2/2 (+ rounding), n = t - _ROUND_SHIFT exactly."""
    t = x * _LOG2E + _ROUND_SHIFT
    nf = t - _ROUND_SHIFT
    return t, (x - nf * _LN2_HI) - nf * _LN2_LO


@njit(inline="always", cache=True)
def _exp_taylor(r):
    """sum_(i <= 13) r^i / i! by Horner's rule (contracted to FMAs only inside fastmath callers)."""
    p = _E13 * r + _E12
    p = p * r + _E11
    p = p * r + _E10
    p = p * r + _E9
    p = p * r + _E8
    p = p * r + _E7
    p = p * r + _E6
    p = p * r + _E5
    p = p * r + _E4
    p = p * r + _E3
    p = p * r + _E2
    p = p * r + _E1
    return p * r + _E0


@njit(inline="always", cache=True)
def portable_exp_nonpositive_inplace(z, scratch):
    """z[b] <- portable_exp(z[b]) for z <= 0 (not nan), bitwise, in branch-free loops that
    vectorise: 2^n is built in the exponent bits, as portable_exp's _pow2, which is exact because n >=
    -1021 on [-708, 0] (2^n and the product stay normal); arguments below -708 give 0 like
    portable_exp. Callers must not run under fastmath (see portable_exp)."""
    width = z.shape[0]
    tb = scratch[:width]
    for b in range(width):
        t, r = _exp_reduce(max(_EXP_MIN, z[b]))
        tb[b] = t
        z[b] = 0.0 if z[b] < _EXP_MIN else _exp_taylor(r)
    bits = tb.view(np.int64)
    for b in range(width):
        bits[b] = (bits[b] + 1023) << 52  # low bits of t hold n; this is 2**n's bit pattern
    for b in range(width):
        z[b] *= tb[b]


@njit(inline="always", cache=True)
def correlation(kernel_id, r2):
    """g(r^2) of the kernel family ``kernel_id`` (kernels.KERNEL_IDS), with portable_exp: the
    accurate path's value, bitwise the Rust oracle's ``Kernel::from_r2``."""
    if kernel_id == 0:
        return portable_exp(-0.5 * r2)
    r = math.sqrt(r2)
    if kernel_id == 1:
        return portable_exp(-r)
    if kernel_id == 2:
        sr = _SQRT3 * r
        return (1.0 + sr) * portable_exp(-sr)
    sr = _SQRT5 * r
    return (1.0 + sr + (5.0 / 3.0) * r2) * portable_exp(-sr)


@njit(inline="always", cache=True)
def two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@intrinsic
def _pow2(typingctx, n):
    """2.0**n for an int64 n in [-1022, 1023], built in the exponent bits (a bitcast, no call).

    portable_exp multiplies by it instead of calling ldexp (a libm call per value, ~2% of a tree
    query): on [-708, 709] n lies in [-1021, 1023] and the Taylor value in [0.70, 1.42], so the
    product is a normal number and exact, the bits ldexp (and the Rust oracle) return.
    """
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        biased = builder.add(args[0], context.get_constant(types.int64, 1023))
        bits = builder.shl(biased, context.get_constant(types.int64, 52))
        return builder.bitcast(bits, context.get_value_type(types.float64))

    return sig, codegen


@intrinsic
def _fma(typingctx, a, b, c):
    """Fused multiply-add (llvm.fma.f64): a * b + c with one rounding."""
    sig = types.float64(types.float64, types.float64, types.float64)

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return sig, codegen


@njit(inline="always", cache=True)
def two_prod(a, b):
    """Error-free product: a * b == p + e exactly (the FMA computes e without rounding)."""
    p = a * b
    return p, _fma(a, b, -p)


@njit(inline="always", cache=True)
def dot2(a, b):
    """Compensated dot product of two 1-D float64 arrays: returns (hi, lo)."""
    s = 0.0
    c = 0.0
    for t in range(a.shape[0]):
        s, c = _dot2_step(s, c, a[t], b[t])
    return s, c


@njit(inline="always", cache=True)
def _dot2_step(s, c, x, y):
    h, e = two_prod(x, y)
    s, q = two_sum(s, h)
    return s, c + (q + e)


@njit(inline="always", cache=True)
def dot2x4(a, b0, b1, b2, b3):
    """``dot2`` of a with four vectors at once: four independent chains, each performing
    exactly dot2's operations in dot2's order (so each result is bitwise dot2's), interleaved
    so the CPU overlaps their latencies. Returns (hi0, lo0, hi1, lo1, hi2, lo2, hi3, lo3)."""
    s0 = s1 = s2 = s3 = 0.0
    c0 = c1 = c2 = c3 = 0.0
    for t in range(a.shape[0]):
        x = a[t]
        s0, c0 = _dot2_step(s0, c0, x, b0[t])
        s1, c1 = _dot2_step(s1, c1, x, b1[t])
        s2, c2 = _dot2_step(s2, c2, x, b2[t])
        s3, c3 = _dot2_step(s3, c3, x, b3[t])
    return s0, c0, s1, c1, s2, c2, s3, c3


@njit(inline="always", cache=True)
def scaled_sq_distance(xa, xb, scale):
    """r^2 = sum_t ((xa_t - xb_t) / l_t)^2 from direct differences (no cancellation)."""
    r2 = 0.0
    for t in range(xa.shape[0]):
        diff = (xa[t] - xb[t]) / scale[t]
        r2 += diff * diff
    return r2


@njit(inline="always", cache=True)
def accurate_abs_rho(xa, va, pa, xb, vb, pb, scale, kernel_id, variance):
    """|rho| for one pair, with Dot2 for V_a.V_b: the parity path's value, clamped to [0, 1]."""
    kval = variance * correlation(kernel_id, scaled_sq_distance(xa, xb, scale))
    hi, lo = dot2(va, vb)
    return _finish_abs_rho(kval, hi, lo, pa, pb)


@njit(inline="always", cache=True)
def _finish_abs_rho(kval, hi, lo, pa, pb):
    c = (kval - hi) - lo
    rho = abs(c) / math.sqrt(pa * pb)
    return min(1.0, rho)


@njit(inline="always", cache=True)
def accurate_abs_rho4(xa, va, pa, x, v, p, j0, j1, j2, j3, scale, kernel_id, variance, out, at):
    """out[at + i] = accurate_abs_rho(xa, va, pa, x[ji], v[ji], p[ji], ...) for i = 0..3,
    bitwise, with the four Dot2 chains interleaved (dot2x4): certification's inner loop."""
    h0, l0, h1, l1, h2, l2, h3, l3 = dot2x4(va, v[j0], v[j1], v[j2], v[j3])
    js, his, los = (j0, j1, j2, j3), (h0, h1, h2, h3), (l0, l1, l2, l3)
    for i in range(4):
        j = js[i]
        kval = variance * correlation(kernel_id, scaled_sq_distance(xa, x[j], scale))
        out[at + i] = _finish_abs_rho(kval, his[i], los[i], pa, p[j])


@njit(parallel=True, cache=True, fastmath=False)
def row_norms(v):
    """||V_i|| with a plain sequential sum of squares (no BLAS, no reordering).

    Deterministic: the Rust oracle reproduces it bit for bit, which the tree's parity preset
    needs (the margins and node summaries depend on it).
    """
    out = np.empty(v.shape[0])
    for i in prange(v.shape[0]):
        s = 0.0
        for t in range(v.shape[1]):
            s += v[i, t] * v[i, t]
        out[i] = math.sqrt(s)
    return out


@njit(parallel=True, cache=True, fastmath=False)
def residual_norms(v, w):
    """||V_i - W_i||, bitwise row_norms(v - w) without forming v - w."""
    out = np.empty(v.shape[0])
    for i in prange(v.shape[0]):
        s = 0.0
        for t in range(v.shape[1]):
            diff = v[i, t] - w[i, t]
            s += diff * diff
        out[i] = math.sqrt(s)
    return out


@njit(inline="always", cache=True, fastmath={"contract"})
def exp_nonpositive_inplace(z, scratch):
    """z[b] <- exp(z[b]) for z <= 0, within 3 ulp of libm; arguments below -708 give exp(-708).

    libm's exp does not vectorise in Numba; this one does (Cody-Waite reduction, a degree-13
    Taylor polynomial on |r| <= ln2/2, and 2^n built in the exponent bits), about 3x faster
    on the hot loop of the CPU backend. Only FMA contraction is allowed, which keeps the
    rounding trick intact. The clamp is harmless: exp(-708) ~ 3e-308 is far below the
    kernel-error margin of precision.py.
    """
    width = z.shape[0]
    tb = scratch[:width]
    for b in range(width):
        x = z[b]
        x = max(-708.0, x)
        t, r = _exp_reduce(x)
        z[b] = _exp_taylor(r)
        tb[b] = t
    bits = tb.view(np.int64)
    for b in range(width):
        bits[b] = (bits[b] + 1023) << 52  # low bits of t hold n; this is 2**n's bit pattern
    for b in range(width):
        z[b] *= tb[b]


# float32 exp for the float32 leaf blocks (docs/precision.md, "float32 kernel values")
_F32 = np.float32
_LOG2E_F32 = _F32(_LOG2E)
_LN2_HI_F32 = _F32(0.693359375)  # 0x3F318000: 12 significant bits, n * _LN2_HI_F32 exact for |n| < 2**12
_LN2_LO_F32 = _F32(-2.12194440e-4)  # ln 2 - _LN2_HI_F32, rounded to float32
_ROUND_SHIFT_F32 = _F32(12582912.0)  # 1.5 * 2**23
_EXP32_MIN = _F32(-87.0)  # exp(-87) ~ 1.6e-38 is still a normal float32
_EXP32_COEF = tuple(_F32(1.0 / math.factorial(i)) for i in range(8))
_C0, _C1, _C2, _C3, _C4, _C5, _C6, _C7 = _EXP32_COEF


@njit(inline="always", cache=True, fastmath={"contract"})
def exp32_nonpositive_inplace(z, scratch):
    """z[b] <- exp(z[b]) for float32 z <= 0, relative error below 32 u (u = 2^-24);
    arguments below -87 give exp(-87).

    The float64 scheme of exp_nonpositive_inplace at float32 width (twice the SIMD lanes):
    Cody-Waite reduction x = n ln2 + r, |r| <= 0.3466, the degree-7 Taylor polynomial
    (truncation < 0.14 u), 2^n in the exponent bits. docs/precision.md derives the bound;
    tests/test_precision.py checks it against float64 exp.
    """
    width = z.shape[0]
    tb = scratch[:width]
    for b in range(width):
        x = max(_EXP32_MIN, z[b])
        t = x * _LOG2E_F32 + _ROUND_SHIFT_F32
        nf = t - _ROUND_SHIFT_F32
        r = (x - nf * _LN2_HI_F32) - nf * _LN2_LO_F32
        p = _C7 * r + _C6
        p = p * r + _C5
        p = p * r + _C4
        p = p * r + _C3
        p = p * r + _C2
        p = p * r + _C1
        z[b] = p * r + _C0
        tb[b] = t
    bits = tb.view(np.int32)
    for b in range(width):
        bits[b] = (bits[b] + 127) << 23  # low bits of t hold n; this is 2**n's bit pattern
    for b in range(width):
        z[b] *= tb[b]
