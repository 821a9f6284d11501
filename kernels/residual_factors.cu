// residual_factors.cu: the problem's factors V = (L^-1 K(U, X))^T, p and ||V_i|| on the device.
//
// Loaded by residual_gpu/backends/cuda.py with cupy.RawModule and compiled by NVRTC with
// --fmad=false: no multiply-add is contracted into an FMA, so that every operation below is the
// IEEE operation of residual_gpu/_linalg.py's _cross_factors, in its order, and V, p and the
// norms are the host build's bits (division and square root are correctly rounded by NVRTC's
// defaults, -prec-div=true and -prec-sqrt=true; the one FMA is the explicit one of Dot2's
// TwoProduct, exact everywhere). That is why this is not cuBLAS's trsm, whose blocking would
// round differently from the host and from one launch shape to the next.
//
// One thread per point (grid-stride): for a = 0 .. m-1 the kernel value k(u_a, x_j) with the
// accurate path's portable_exp, then forward substitution y_a = (k - sum_(t < a) L[a, t] y_t) /
// L[a, a] with t ascending, then Dot2 of y with itself for p and a plain sum for the norm. The
// solved values live in yt (m, q), so that a warp's threads read consecutive addresses.
//
// Like residual_select.cu it is plain CUDA C++ that RG_HOST_EMULATION lets a host compiler
// build (tests/test_cuda_backend.py), so the bitwise claim is tested without a GPU.

#ifndef RG_HOST_EMULATION
#define rg_fma __fma_rn
#else
#define rg_fma std::fma
#endif

// The constants of residual_gpu._numba_math, passed in by the host (cuda.FACTOR_CONSTANTS)
// rather than retyped here: LOG2E, ROUND_SHIFT, LN2_HI, LN2_LO, EXP_MIN, EXP_MAX, SQRT3, SQRT5,
// then the 14 Taylor coefficients 1/i!.
#define RG_C_LOG2E 0
#define RG_C_SHIFT 1
#define RG_C_LN2_HI 2
#define RG_C_LN2_LO 3
#define RG_C_EXP_MIN 4
#define RG_C_EXP_MAX 5
#define RG_C_SQRT3 6
#define RG_C_SQRT5 7
#define RG_C_TAYLOR 8

// _numba_math.portable_exp: Cody-Waite reduction, Horner's rule, 2^n exactly (ldexp).
__device__ __forceinline__ double rg_portable_exp(double x, const double* c)
{
    if (x != x) return x;
    if (x < c[RG_C_EXP_MIN]) return 0.0;
    if (x > c[RG_C_EXP_MAX]) return 1.0 / 0.0;
    const double t = x * c[RG_C_LOG2E] + c[RG_C_SHIFT];
    const double nf = t - c[RG_C_SHIFT];
    const double r = (x - nf * c[RG_C_LN2_HI]) - nf * c[RG_C_LN2_LO];
    double p = c[RG_C_TAYLOR + 13] * r + c[RG_C_TAYLOR + 12];
    for (int i = 11; i >= 0; --i) p = p * r + c[RG_C_TAYLOR + i];
    return ldexp(p, (int)(t - c[RG_C_SHIFT]));
}

// _linalg._kernel_row for one point: variance * correlation(r2), r2 = sum_t ((u_t - x_t) / l_t)^2.
__device__ __forceinline__ double rg_kernel_value(int kernel_id, double variance, const double* u,
                                                  const double* x, const double* scale, int d,
                                                  const double* c)
{
    double r2 = 0.0;
    for (int t = 0; t < d; ++t) {
        const double diff = (u[t] - x[t]) / scale[t];
        r2 += diff * diff;
    }
    double k;
    if (kernel_id == 0) {
        k = rg_portable_exp(-0.5 * r2, c);
    } else if (kernel_id == 1) {
        k = rg_portable_exp(-sqrt(r2), c);
    } else {
        const double cs = kernel_id == 2 ? c[RG_C_SQRT3] : c[RG_C_SQRT5];
        const double r2_coef = kernel_id == 2 ? 0.0 : 5.0 / 3.0;
        const double sr = cs * sqrt(r2);
        const double poly = (1.0 + sr) + r2_coef * r2;
        k = poly * rg_portable_exp(-sr, c);
    }
    return variance * k;
}

extern "C" __global__ void residual_cross_factors(
    const double* __restrict__ chol, int m, const double* __restrict__ u, int d,
    const double* __restrict__ x, long long q, const double* __restrict__ scale,
    const double* __restrict__ consts, int kernel_id, double variance, double floor,
    double* __restrict__ yt, double* __restrict__ v, double* __restrict__ p, double* __restrict__ norms)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < q; j += stride) {
        const double* xj = x + j * d;
        for (int a = 0; a < m; ++a) {
            double acc = rg_kernel_value(kernel_id, variance, u + (long long)a * d, xj, scale, d, consts);
            const double* la = chol + (long long)a * m;
            for (int t = 0; t < a; ++t) acc = acc - la[t] * yt[(long long)t * q + j];
            yt[(long long)a * q + j] = acc / la[a];
        }
        double hi = 0.0, lo = 0.0, sq = 0.0;  // Dot2 (two_prod, two_sum) and the plain sum
        for (int a = 0; a < m; ++a) {
            const double ya = yt[(long long)a * q + j];
            const double h = ya * ya;
            const double e = rg_fma(ya, ya, -h);
            const double s = hi + h;
            const double bb = s - hi;
            const double qq = (hi - (s - bb)) + (h - bb);
            hi = s;
            lo = lo + (qq + e);
            sq += ya * ya;
            v[j * m + a] = ya;
        }
        const double left = (variance - hi) - lo;
        p[j] = left > floor ? left : floor;
        norms[j] = sqrt(sq);
    }
}
