// residual_select.cu: the fused transform and streaming select of residual_gpu's CuPy backend.
//
// Loaded by residual_gpu/backends/cuda.py with cupy.RawModule (compiled by NVRTC on first
// use, cached by CuPy), with -DRG_SELECT_BLOCK=<threads per block> so that host and device
// agree on the block size. The GEMM G = V_Q V_C^T is done beforehand by cuBLAS (cupy.matmul:
// DGEMM, or SGEMM for a float32 fast pass); these kernels take one tile of G and turn it into fast
//
//     a = min(|variance * g(r2) - G| * (1 / sqrt(p_q)) * (1 / sqrt(p_c)), 1)
//
// with r2 from direct coordinate differences times 1 / lengthscale, exactly the formula
// (and operation order) of the CPU backend (residual_gpu/backends/cpu.py, _abs_rho_row).
// Every kernel comes twice: for float64 G (`residual_...`) and for float32 G (`..._f32`), whose
// correlation g(r2) is evaluated in float32 from r2 rounded to float32, as the CPU's _corr32;
// r2 and a stay float64 in both. Rounding differences (libdevice exp vs. the CPU polynomial,
// FMA contraction) are within the kernel-error margin of residual_gpu/precision.py of G's
// precision; certification happens on the host.
//
// The file is plain CUDA C++ that NVRTC compiles without any include. Defining
// RG_HOST_EMULATION lets the test suite compile the very same kernels with a host C++
// compiler (threads emulated with std::thread and a barrier, see tests/test_cuda_backend.py),
// so that the select logic is exercised on machines without a GPU.

#ifndef RG_SELECT_BLOCK
#define RG_SELECT_BLOCK 256
#endif

static_assert((RG_SELECT_BLOCK & (RG_SELECT_BLOCK - 1)) == 0 && RG_SELECT_BLOCK >= 1,
              "RG_SELECT_BLOCK must be a power of two (tree reduction)");

#ifdef RG_HOST_EMULATION
// the test harness has defined __global__, __device__, __shared__, threadIdx, blockIdx,
// blockDim, gridDim, __syncthreads, atomicAdd and RG_DYNAMIC_SHARED before including us
#else
#define RG_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

#define RG_SQRT3 1.7320508075688772  /* math.sqrt(3.0), as residual_gpu._numba_math._SQRT3 */
#define RG_SQRT5 2.23606797749979    /* math.sqrt(5.0) */
#ifndef RG_EXP32_CLAMP  /* -residual_gpu._numba_math._EXP32_MIN, passed by backends.cuda.select_options */
#error "compile with -DRG_EXP32_CLAMP=<float>f (residual_gpu.backends.cuda.select_options)"
#endif

// Sentinels: every a is in [0, 1] (fabs, then the clamp, which also sends NaN to 1), so a
// threshold of -2 admits everything and +2 admits nothing.
#define RG_ADMIT_ALL (-2.0)
#define RG_ADMIT_NONE 2.0

// The correlation g(r2) in double precision.
__device__ __forceinline__ double rg_corr(int kernel_id, double r2, double)
{
    if (kernel_id == 0) return exp(-0.5 * r2);   // RBF
    if (kernel_id == 1) return exp(-sqrt(r2));   // Matern 1/2
    const double c = kernel_id == 2 ? RG_SQRT3 : RG_SQRT5;  // Matern 3/2, 5/2
    const double r2_coef = kernel_id == 2 ? 0.0 : 5.0 / 3.0;
    const double sr = c * sqrt(r2);
    return exp(-sr) * (1.0 + sr + r2_coef * r2);
}

// The correlation in single precision from r2 rounded to float (the CPU's _corr32). Beyond
// the exp's range (s > 87) the Matern polynomial could reach inf (and inf * 0 = NaN); the
// exact value there is below 5e-35, so 0, as on the CPU.
__device__ __forceinline__ double rg_corr(int kernel_id, double r2d, float)
{
    const float r2 = (float)r2d;
    if (kernel_id == 0) return (double)expf(-0.5f * r2);
    if (kernel_id == 1) return (double)expf(-sqrtf(r2));
    const float c = kernel_id == 2 ? (float)RG_SQRT3 : (float)RG_SQRT5;
    const float r2_coef = kernel_id == 2 ? 0.0f : 5.0f / 3.0f;
    const float sr = c * sqrtf(r2);
    return sr <= RG_EXP32_CLAMP ? (double)(expf(-sr) * (1.0f + sr + r2_coef * r2)) : 0.0;
}

// Fast |rho| of query (xq, ipq) against column `col` of the transposed coordinates xt
// (d rows of leading dimension ldx), given g = V_q . V_col (of type T, which picks the
// precision of the correlation) and ipc = 1 / sqrt(p_col).
template <typename T>
__device__ __forceinline__ double rg_abs_rho(int kernel_id, double variance, const double* xq,
                                             const double* inv_scale, int d, double ipq,
                                             const double* xt, long long ldx, long long col,
                                             T g, double ipc)
{
    double r2 = 0.0;
    for (int t = 0; t < d; ++t) {
        const double diff = (xq[t] - xt[(long long)t * ldx + col]) * inv_scale[t];
        r2 += diff * diff;
    }
    const double k = rg_corr(kernel_id, r2, g);
    const double a = fabs(variance * k - (double)g) * ipq * ipc;
    return a < 1.0 ? a : 1.0;
}

// Dense tile: out[r, b] = a(query r, candidate b) for rows x cols entries, row-major.
// g (rows, cols) = V_Q V_C^T (double or float); qx (rows, d); xc (d, cols) the candidates' coordinates,
// transposed; qip (rows,), ipc (cols,) the 1 / sqrt(p). Grid-stride loop, any launch shape.
template <typename T>
__device__ __forceinline__ void rg_abs_rho_dense(
    const T* __restrict__ g, long long rows, long long cols,
    const double* __restrict__ qx, int d, const double* __restrict__ qip,
    const double* __restrict__ xc, const double* __restrict__ ipc,
    const double* __restrict__ inv_scale, int kernel_id, double variance,
    double* __restrict__ out)
{
    const long long total = rows * cols;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const long long r = e / cols;
        const long long b = e - r * cols;
        out[e] = rg_abs_rho(kernel_id, variance, qx + r * d, inv_scale, d, qip[r], xc, cols, b, g[e], ipc[b]);
    }
}

#define RG_DENSE_PARAMS(T)                                                                  \
    const T* __restrict__ g, long long rows, long long cols, const double* __restrict__ qx, \
    int d, const double* __restrict__ qip, const double* __restrict__ xc,                   \
    const double* __restrict__ ipc, const double* __restrict__ inv_scale, int kernel_id,    \
    double variance, double* __restrict__ out
#define RG_DENSE_ARGS g, rows, cols, qx, d, qip, xc, ipc, inv_scale, kernel_id, variance, out

extern "C" __global__ void residual_abs_rho_dense(RG_DENSE_PARAMS(double)) { rg_abs_rho_dense(RG_DENSE_ARGS); }
extern "C" __global__ void residual_abs_rho_dense_f32(RG_DENSE_PARAMS(float)) { rg_abs_rho_dense(RG_DENSE_ARGS); }

// Thread 0's insertion of one candidate into its query's bounded min-heap (the `keep`
// largest a), exactly as CpuBackend's _select_tile: whatever is not kept raises *dropped.
__device__ __forceinline__ void rg_heap_offer(double* ha, long long* hi, int keep, int* size,
                                              double* dropped, double a, long long j)
{
    if (*size < keep) {              // push, sift up
        int pos = (*size)++;
        ha[pos] = a;
        hi[pos] = j;
        while (pos > 0) {
            const int parent = (pos - 1) / 2;
            if (ha[parent] <= ha[pos]) break;
            const double ta = ha[pos]; ha[pos] = ha[parent]; ha[parent] = ta;
            const long long ti = hi[pos]; hi[pos] = hi[parent]; hi[parent] = ti;
            pos = parent;
        }
    } else if (keep > 0 && a > ha[0]) {  // replace the root, sift down
        if (ha[0] > *dropped) *dropped = ha[0];
        ha[0] = a;
        hi[0] = j;
        int pos = 0;
        for (;;) {
            int child = 2 * pos + 1;
            if (child >= keep) break;
            if (child + 1 < keep && ha[child + 1] < ha[child]) child += 1;
            if (ha[child] >= ha[pos]) break;
            const double ta = ha[pos]; ha[pos] = ha[child]; ha[child] = ta;
            const long long ti = hi[pos]; hi[pos] = hi[child]; hi[child] = ti;
            pos = child;
        }
    } else if (a > *dropped) {
        *dropped = a;
    }
}

// Streaming select, one candidate tile: columns c0 .. c0 + width - 1 of the data set.
//
// One thread block of RG_SELECT_BLOCK threads per query row (grid = rows of the query tile).
// The row's state lives in global memory between tiles: heap_a / heap_i (rows, keep), the
// heap size `count`, `a_dropped` and `evaluations`. Admissible columns are
// j < qlimit[row] and j != qself[row].
//
// Per chunk of RG_SELECT_BLOCK columns every thread computes one a. Against the current
// threshold s_thr (the heap's minimum once it is full, RG_ADMIT_ALL before) a candidate
// either survives, and is appended to a shared buffer, or is certainly not kept and only
// raises the thread's running dropped maximum. Thread 0 then offers the survivors to the
// heap one by one (evictions and rejections raise the dropped maximum) and publishes the
// new threshold. At the end a block reduction folds the threads' dropped maxima in. So
// a_dropped is the exact maximum over every admissible candidate not kept.
//
// With use_shared_heap != 0 the heap is staged in dynamic shared memory (the launch must
// give keep * 16 bytes), else thread 0 works on it in global memory.
template <typename T>
__device__ __forceinline__ void rg_select_tile(
    const T* __restrict__ g, int width,
    const double* __restrict__ qx, int d, const double* __restrict__ qip,
    const long long* __restrict__ qself, const long long* __restrict__ qlimit,
    const double* __restrict__ xt, long long n, const double* __restrict__ ip,
    const double* __restrict__ inv_scale, int kernel_id, double variance, long long c0,
    double* heap_a, long long* heap_i, int keep, int use_shared_heap,
    int* count, double* a_dropped, long long* evaluations)
{
    __shared__ double s_a[RG_SELECT_BLOCK];
    __shared__ long long s_j[RG_SELECT_BLOCK];
    __shared__ double s_red[RG_SELECT_BLOCK];
    __shared__ int s_n;
    __shared__ double s_thr;
    RG_DYNAMIC_SHARED(double, s_heap);

    const int row = blockIdx.x;
    const int tid = threadIdx.x;
    const long long span = qlimit[row] - c0;  // admissible columns of this tile: [0, w)
    if (span <= 0 || width <= 0) return;  // the same for the whole block: no barrier is half-skipped
    const int w = span < (long long)width ? (int)span : width;
    const long long skip = qself[row] - c0;

    double* ha = heap_a + (long long)row * keep;
    long long* hi = heap_i + (long long)row * keep;
    if (use_shared_heap) {
        double* sha = s_heap;
        long long* shi = (long long*)(s_heap + keep);
        for (int t = tid; t < keep; t += RG_SELECT_BLOCK) {
            sha[t] = ha[t];
            shi[t] = hi[t];
        }
        ha = sha;
        hi = shi;
    }
    int size = 0;          // meaningful in thread 0 only
    double dropped = -1.0; // thread 0: heap evictions and rejections
    if (tid == 0) {
        size = count[row];
        dropped = a_dropped[row];
        s_n = 0;
    }
    __syncthreads();  // the staged heap is visible
    if (tid == 0) s_thr = size < keep ? RG_ADMIT_ALL : (keep > 0 ? ha[0] : RG_ADMIT_NONE);
    __syncthreads();

    const T* grow = g + (long long)row * width;
    const double* xq = qx + (long long)row * d;
    const double ipq = qip[row];
    double local_drop = -1.0;  // every thread: candidates below the threshold
    for (int base = 0; base < w; base += RG_SELECT_BLOCK) {
        const int b = base + tid;
        const double thr = s_thr;
        if (b < w && (long long)b != skip) {
            const long long j = c0 + b;
            const double a = rg_abs_rho(kernel_id, variance, xq, inv_scale, d, ipq, xt, n, j, grow[b], ip[j]);
            if (a > thr) {
                const int slot = atomicAdd(&s_n, 1);
                s_a[slot] = a;
                s_j[slot] = j;
            } else if (a > local_drop) {
                local_drop = a;
            }
        }
        __syncthreads();  // survivors are in the buffer
        if (tid == 0) {
            const int survivors = s_n;
            for (int s = 0; s < survivors; ++s) rg_heap_offer(ha, hi, keep, &size, &dropped, s_a[s], s_j[s]);
            s_n = 0;
            s_thr = size < keep ? RG_ADMIT_ALL : (keep > 0 ? ha[0] : RG_ADMIT_NONE);
        }
        __syncthreads();  // buffer emptied, threshold published
    }

    s_red[tid] = local_drop;
    __syncthreads();
    for (int half = RG_SELECT_BLOCK / 2; half > 0; half >>= 1) {
        if (tid < half && s_red[tid + half] > s_red[tid]) s_red[tid] = s_red[tid + half];
        __syncthreads();
    }
    if (use_shared_heap) {
        double* gha = heap_a + (long long)row * keep;
        long long* ghi = heap_i + (long long)row * keep;
        for (int t = tid; t < keep; t += RG_SELECT_BLOCK) {
            gha[t] = ha[t];
            ghi[t] = hi[t];
        }
    }
    if (tid == 0) {
        count[row] = size;
        a_dropped[row] = s_red[0] > dropped ? s_red[0] : dropped;
        evaluations[row] += w - ((skip >= 0 && skip < (long long)w) ? 1 : 0);
    }
}

#define RG_SELECT_PARAMS(T)                                                                    \
    const T* __restrict__ g, int width, const double* __restrict__ qx, int d,                  \
    const double* __restrict__ qip, const long long* __restrict__ qself,                       \
    const long long* __restrict__ qlimit, const double* __restrict__ xt, long long n,          \
    const double* __restrict__ ip, const double* __restrict__ inv_scale, int kernel_id,        \
    double variance, long long c0, double* heap_a, long long* heap_i, int keep,                \
    int use_shared_heap, int* count, double* a_dropped, long long* evaluations
#define RG_SELECT_ARGS g, width, qx, d, qip, qself, qlimit, xt, n, ip, inv_scale, kernel_id, variance, c0, \
    heap_a, heap_i, keep, use_shared_heap, count, a_dropped, evaluations

extern "C" __global__ void residual_select_tile(RG_SELECT_PARAMS(double)) { rg_select_tile(RG_SELECT_ARGS); }
extern "C" __global__ void residual_select_tile_f32(RG_SELECT_PARAMS(float)) { rg_select_tile(RG_SELECT_ARGS); }
