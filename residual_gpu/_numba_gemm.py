"""A small-matrix product for the tree's leaf blocks: out = a @ b.T without BLAS's packing.

A leaf block is (alive query rows, ~30-128) x (a leaf's points, ~64) x m (512 on `vif`). At
that size BLAS spends as long copying both operands into its packed panels as multiplying
them; both operands here already have unit stride along k (rows of V), so a register-blocked
loop of 4 x 3 dot products reads them in place (docs/tree.md section 4, "Where the time goes").

fastmath lets LLVM split each dot product over SIMD lanes; the fast values' margin
(docs/precision.md, gamma_(m+2)) bounds a dot product summed in any order, so it holds.
"""

from __future__ import annotations

from numba import njit

# The 4 x 3 block keeps 12 vector accumulators, the 3 rows of b at step k and one row of a in
# registers: 16, all AVX2 has (AVX-512 has 32). A 4 x 4 block needs 20 and LLVM spilled 7
# accumulators to the stack on every step: 44 GFLOP/s in float32 on one Zen 2 core against
# 72 for 4 x 3 and 84 for OpenBLAS on a large product (docs/benchmarks.md, "The leaf blocks'
# own product").


@njit(inline="always", fastmath=True, cache=True)
def _block4x3(a, i, b, j, out):
    a0 = a[i]
    a1 = a[i + 1]
    a2 = a[i + 2]
    a3 = a[i + 3]
    b0 = b[j]
    b1 = b[j + 1]
    b2 = b[j + 2]
    c00 = a0[0] * b0[0]
    c01 = a0[0] * b1[0]
    c02 = a0[0] * b2[0]
    c10 = a1[0] * b0[0]
    c11 = a1[0] * b1[0]
    c12 = a1[0] * b2[0]
    c20 = a2[0] * b0[0]
    c21 = a2[0] * b1[0]
    c22 = a2[0] * b2[0]
    c30 = a3[0] * b0[0]
    c31 = a3[0] * b1[0]
    c32 = a3[0] * b2[0]
    for k in range(1, a.shape[1]):
        y0 = b0[k]
        y1 = b1[k]
        y2 = b2[k]
        x = a0[k]
        c00 += x * y0
        c01 += x * y1
        c02 += x * y2
        x = a1[k]
        c10 += x * y0
        c11 += x * y1
        c12 += x * y2
        x = a2[k]
        c20 += x * y0
        c21 += x * y1
        c22 += x * y2
        x = a3[k]
        c30 += x * y0
        c31 += x * y1
        c32 += x * y2
    out[i, j] = c00
    out[i, j + 1] = c01
    out[i, j + 2] = c02
    out[i + 1, j] = c10
    out[i + 1, j + 1] = c11
    out[i + 1, j + 2] = c12
    out[i + 2, j] = c20
    out[i + 2, j + 1] = c21
    out[i + 2, j + 2] = c22
    out[i + 3, j] = c30
    out[i + 3, j + 1] = c31
    out[i + 3, j + 2] = c32


@njit(inline="always", fastmath=True, cache=True)
def _block1x3(a, i, b, j, out):
    x = a[i]
    b0 = b[j]
    b1 = b[j + 1]
    b2 = b[j + 2]
    c0 = x[0] * b0[0]
    c1 = x[0] * b1[0]
    c2 = x[0] * b2[0]
    for k in range(1, a.shape[1]):
        c0 += x[k] * b0[k]
        c1 += x[k] * b1[k]
        c2 += x[k] * b2[k]
    out[i, j] = c0
    out[i, j + 1] = c1
    out[i, j + 2] = c2


@njit(inline="always", fastmath=True, cache=True)
def _block4x1(a, i, b, j, out):
    y = b[j]
    a0 = a[i]
    a1 = a[i + 1]
    a2 = a[i + 2]
    a3 = a[i + 3]
    c0 = a0[0] * y[0]
    c1 = a1[0] * y[0]
    c2 = a2[0] * y[0]
    c3 = a3[0] * y[0]
    for k in range(1, a.shape[1]):
        c0 += a0[k] * y[k]
        c1 += a1[k] * y[k]
        c2 += a2[k] * y[k]
        c3 += a3[k] * y[k]
    out[i, j] = c0
    out[i + 1, j] = c1
    out[i + 2, j] = c2
    out[i + 3, j] = c3


@njit(inline="always", fastmath=True, cache=True)
def _dot(a, i, b, j):
    x = a[i]
    y = b[j]
    c = x[0] * y[0]
    for k in range(1, a.shape[1]):
        c += x[k] * y[k]
    return c


@njit(fastmath=True, cache=True)
def gather_dots(x, b, start, cols, n, out):
    """out[s] = x . b[start + cols[s]] for s < n, summed in any order (fastmath; not inlined, so
    that a caller without fastmath still gets the vectorised sum)."""
    for s in range(n):
        y = b[start + cols[s]]
        c = x[0] * y[0]
        for k in range(1, x.shape[0]):
            c += x[k] * y[k]
        out[s] = c


@njit(fastmath=True, cache=True)
def gemm_nt(a, b, out):
    """out[:M, :N] = a @ b.T for a (M, K) and b (N, K) with unit stride along K, in
    their dtype; out may be wider than N. Returns out."""
    rows = a.shape[0]
    cols = b.shape[0]
    if a.shape[1] == 0:  # no inducing points: V has no columns
        out[:rows, :cols] = 0
        return out
    r4 = rows - rows % 4
    c3 = cols - cols % 3
    for j in range(0, c3, 3):
        for i in range(0, r4, 4):
            _block4x3(a, i, b, j, out)
        for i in range(r4, rows):
            _block1x3(a, i, b, j, out)
    for j in range(c3, cols):
        for i in range(0, r4, 4):
            _block4x1(a, i, b, j, out)
        for i in range(r4, rows):
            out[i, j] = _dot(a, i, b, j)
    return out
