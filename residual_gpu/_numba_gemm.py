"""A small-matrix product for the tree's leaf blocks: out = a @ b.T without BLAS's packing.

A leaf block is (alive query rows, ~30-128) x (a leaf's points, ~64) x m (512 on `vif`). At
that size BLAS spends as long copying both operands into its packed panels as multiplying
them; both operands here already have unit stride along k (rows of V), so a register-blocked
loop of 4 x 4 dot products reads them in place (docs/tree.md section 4, "Where the time goes").

fastmath lets LLVM split each dot product over SIMD lanes; the fast values' margin
(docs/precision.md, gamma_(m+2)) bounds a dot product summed in any order, so it holds.
"""

from __future__ import annotations

from numba import njit

# The 4 x 4 block keeps 16 vector accumulators and 8 row pointers in registers (AVX2 has 16
# vector registers, AVX-512 32); larger blocks spill on AVX2.


@njit(inline="always", fastmath=True, cache=True)
def _block4x4(a, i, b, j, out):
    a0 = a[i]
    a1 = a[i + 1]
    a2 = a[i + 2]
    a3 = a[i + 3]
    b0 = b[j]
    b1 = b[j + 1]
    b2 = b[j + 2]
    b3 = b[j + 3]
    c00 = a0[0] * b0[0]
    c01 = a0[0] * b1[0]
    c02 = a0[0] * b2[0]
    c03 = a0[0] * b3[0]
    c10 = a1[0] * b0[0]
    c11 = a1[0] * b1[0]
    c12 = a1[0] * b2[0]
    c13 = a1[0] * b3[0]
    c20 = a2[0] * b0[0]
    c21 = a2[0] * b1[0]
    c22 = a2[0] * b2[0]
    c23 = a2[0] * b3[0]
    c30 = a3[0] * b0[0]
    c31 = a3[0] * b1[0]
    c32 = a3[0] * b2[0]
    c33 = a3[0] * b3[0]
    for k in range(1, a.shape[1]):
        x0 = a0[k]
        x1 = a1[k]
        x2 = a2[k]
        x3 = a3[k]
        y0 = b0[k]
        y1 = b1[k]
        y2 = b2[k]
        y3 = b3[k]
        c00 += x0 * y0
        c01 += x0 * y1
        c02 += x0 * y2
        c03 += x0 * y3
        c10 += x1 * y0
        c11 += x1 * y1
        c12 += x1 * y2
        c13 += x1 * y3
        c20 += x2 * y0
        c21 += x2 * y1
        c22 += x2 * y2
        c23 += x2 * y3
        c30 += x3 * y0
        c31 += x3 * y1
        c32 += x3 * y2
        c33 += x3 * y3
    out[i, j] = c00
    out[i, j + 1] = c01
    out[i, j + 2] = c02
    out[i, j + 3] = c03
    out[i + 1, j] = c10
    out[i + 1, j + 1] = c11
    out[i + 1, j + 2] = c12
    out[i + 1, j + 3] = c13
    out[i + 2, j] = c20
    out[i + 2, j + 1] = c21
    out[i + 2, j + 2] = c22
    out[i + 2, j + 3] = c23
    out[i + 3, j] = c30
    out[i + 3, j + 1] = c31
    out[i + 3, j + 2] = c32
    out[i + 3, j + 3] = c33


@njit(inline="always", fastmath=True, cache=True)
def _block1x4(a, i, b, j, out):
    x = a[i]
    b0 = b[j]
    b1 = b[j + 1]
    b2 = b[j + 2]
    b3 = b[j + 3]
    c0 = x[0] * b0[0]
    c1 = x[0] * b1[0]
    c2 = x[0] * b2[0]
    c3 = x[0] * b3[0]
    for k in range(1, a.shape[1]):
        c0 += x[k] * b0[k]
        c1 += x[k] * b1[k]
        c2 += x[k] * b2[k]
        c3 += x[k] * b3[k]
    out[i, j] = c0
    out[i, j + 1] = c1
    out[i, j + 2] = c2
    out[i, j + 3] = c3


@njit(inline="always", fastmath=True, cache=True)
def _dot(a, i, b, j):
    x = a[i]
    y = b[j]
    c = x[0] * y[0]
    for k in range(1, a.shape[1]):
        c += x[k] * y[k]
    return c


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
    c4 = cols - cols % 4
    for j in range(0, c4, 4):
        for i in range(0, r4, 4):
            _block4x4(a, i, b, j, out)
        for i in range(r4, rows):
            _block1x4(a, i, b, j, out)
    for j in range(c4, cols):
        for i in range(rows):
            out[i, j] = _dot(a, i, b, j)
    return out
