"""BLAS's thread count, and its triangular kernels called from Numba's threads.

``single_blas_thread`` limits BLAS to one thread wherever Numba's threads call it side by side
(brute force's tiles, the leaf filter's bases, the tree's query factors).

scipy's wrappers hold the GIL, so two Python threads cannot run them side by side, and two
BLAS threads cost more than they save here: after a two-thread call OpenBLAS's idle worker
spins for ~0.1 s and takes a core from the traversal that follows (~50 ms per query chunk
measured). Instead each of Numba's threads calls the single-threaded BLAS on its
own rows, through scipy's Cython BLAS (the function pointers Numba's own ``np.dot`` uses), as
brute force's tiles already do.
"""

from __future__ import annotations

import functools

import llvmlite.binding
import numba
import numpy as np
import scipy.linalg  # noqa: F401 (Numba's np.dot calls scipy's BLAS: loaded before _blas_controller looks)
from numba import njit, prange, types
from numba.extending import get_cython_function_address
from threadpoolctl import ThreadpoolController


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """The BLAS libraries loaded with numpy and scipy, found once."""
    return ThreadpoolController()


def single_blas_thread():
    """A context in which BLAS runs on one thread (Numba's threads run the GEMMs side by side):
    threadpoolctl's limit through one cached controller, since ``threadpool_limits`` scans the
    process's libraries again on every call (~1 ms, paid per search call)."""
    return _blas_controller().limit(limits=1, user_api="blas")


def _blas_function(name: str):
    """scipy's Cython BLAS ``name`` as an external symbol of Numba's code: compiled code names it
    (so Numba can cache it, unlike a ctypes pointer), the address is bound again at each import.
    ?trsm and ?trmm share one Fortran signature: side, uplo, transa, diag, m, n, alpha, a, lda, b, ldb."""
    symbol = f"residual_gpu_blas_{name}"
    llvmlite.binding.add_symbol(symbol, get_cython_function_address("scipy.linalg.cython_blas", name))
    return types.ExternalFunction(symbol, types.void(*([types.voidptr] * 11)))


_dtrsm = _blas_function("dtrsm")
_dtrmm = _blas_function("dtrmm")
# the flags as Fortran characters: B := op(A)^-1 B or op(A) B, A on the left, upper, no transpose,
# non-unit diagonal (L's rows in C order are the columns of the upper triangular L^T in Fortran's)
_FLAGS = np.frombuffer(b"LUNN", dtype=np.uint8).copy()


@njit(parallel=True, cache=True, fastmath=False)
def _solve_rows(t, v, a, back, pieces):
    """a[i] = T^-T v[i] and back[i] = T^T a[i] for the rows of v, in ``pieces`` row ranges, one
    BLAS call pair per range and Numba thread."""
    q, m = v.shape
    dims = np.empty((pieces, 3), dtype=np.int32)  # per piece: m, rows, leading dimension
    alpha = np.ones(1)
    for k in prange(pieces):
        lo = q * k // pieces
        hi = q * (k + 1) // pieces
        if hi == lo:
            continue
        a[lo:hi] = v[lo:hi]  # trsm and trmm work in place
        dims[k, 0] = m
        dims[k, 1] = hi - lo
        dims[k, 2] = m
        # in Fortran's view the C-ordered rows [lo, hi) are the columns of an m x (hi - lo) matrix
        _dtrsm(_FLAGS[0:].ctypes, _FLAGS[1:].ctypes, _FLAGS[2:].ctypes, _FLAGS[3:].ctypes, dims[k, 0:].ctypes,
               dims[k, 1:].ctypes, alpha.ctypes, t.ctypes, dims[k, 2:].ctypes, a[lo:hi].ctypes, dims[k, 2:].ctypes)
        back[lo:hi] = a[lo:hi]
        _dtrmm(_FLAGS[0:].ctypes, _FLAGS[1:].ctypes, _FLAGS[2:].ctypes, _FLAGS[3:].ctypes, dims[k, 0:].ctypes,
               dims[k, 1:].ctypes, alpha.ctypes, t.ctypes, dims[k, 2:].ctypes, back[lo:hi].ctypes, dims[k, 2:].ctypes)


def solve_transposed(t: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a, back) with a_i = T^-T v_i and back_i = T^T a_i (as computed) for the rows v_i of v,
    T lower triangular (m x m, nonsingular): the rows split among Numba's threads."""
    t = np.ascontiguousarray(t, dtype=np.float64)
    v = np.ascontiguousarray(v, dtype=np.float64)
    a = np.empty_like(v)
    back = np.empty_like(v)
    if v.shape[0] and v.shape[1]:
        with single_blas_thread():
            _solve_rows(t, v, a, back, min(numba.get_num_threads(), v.shape[0]))
    return a, back
