// Shared device helpers for the elra kernels.
//
// Conventions (every kernel in cuda/):
// - One thread block per matrix (or per adapter) of a batch; blockIdx.x is the batch index.
// - Blocks have exactly ELRA_BLOCK threads (the host launches them so); helpers that end with a
//   barrier must be called by every thread of the block, never from divergent code.
// - Matrices are row-major: entry (i, j) of an n×n matrix is at i*n + j.
// - Per-matrix status codes are written to status[blockIdx.x] (ELRA_OK when the matrix succeeded).
// - Arithmetic is IEEE f32 or f64 with FMA; the build never uses --use_fast_math.
#pragma once

#include <math_constants.h>

// Threads per block. The host launches exactly this many (src/cuda/device.rs BLOCK_THREADS).
// Overridable only for the CPU emulation of the kernels (cuda/emu/), where the matrix-function
// results do not depend on it (every entry is computed by one thread in a fixed order and the
// block reductions there are maxima).
#ifndef ELRA_BLOCK
#define ELRA_BLOCK 256
#endif

// Declares the block's dynamic shared memory (the CPU emulation provides its own definition).
#ifndef ELRA_EMULATE
#define ELRA_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// Status codes, mirrored by `MatrixStatus` in src/cuda/kernels.rs.
#define ELRA_OK 0
#define ELRA_NONFINITE_INPUT 1
#define ELRA_OVERFLOW 2
#define ELRA_SINGULAR 3
#define ELRA_BAD_SIZE 4

namespace elra {

template <typename T> __device__ __forceinline__ T quiet_nan();
template <> __device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double quiet_nan<double>() {
    return __longlong_as_double(0x7ff8000000000000LL);
}

__device__ __forceinline__ float fma_(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_(double a, double b, double c) { return fma(a, b, c); }
__device__ __forceinline__ float abs_(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_(double x) { return fabs(x); }
__device__ __forceinline__ bool finite_(float x) { return isfinite(x); }
__device__ __forceinline__ bool finite_(double x) { return isfinite(x); }
// x · 2^e, exact unless the result under/overflows.
__device__ __forceinline__ float ldexp_(float x, int e) { return ldexpf(x, e); }
__device__ __forceinline__ double ldexp_(double x, int e) { return ldexp(x, e); }

// Max that propagates NaN (fmax would drop it).
template <typename T> __device__ __forceinline__ T nan_max(T a, T b) {
    return (a != a) ? a : ((b != b) ? b : (a > b ? a : b));
}

// Lanes of a warp (the emulation runs blocks of fewer threads than a warp: then the whole block
// is one "warp"). ELRA_BLOCK is a power of two and a multiple of ELRA_WARP.
#define ELRA_WARP (ELRA_BLOCK < 32 ? ELRA_BLOCK : 32)
#define ELRA_NWARPS (ELRA_BLOCK / ELRA_WARP)

// Block-wide maxima. Every thread passes its partial value and receives the block result;
// `red` is a shared array of at least ELRA_NWARPS entries. A butterfly of warp shuffles, one
// barrier, every thread folding the ELRA_NWARPS warp maxima, one barrier before `red` is reused:
// 2 barriers instead of thread 0 scanning ELRA_BLOCK partials (≈ 4·10³ cycles, measured to
// dominate the φ1 kernel on an H100). A maximum does not depend on the order in which partials
// are combined (NaN handling below is order-free too), so results stay bit-identical to the
// CPU core's sequential fold.
template <typename T, typename Op> __device__ T block_reduce_max(T v, T* red, Op op) {
    for (int o = ELRA_WARP / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (threadIdx.x % ELRA_WARP == 0) red[threadIdx.x / ELRA_WARP] = v;
    __syncthreads();
    T m = red[0];
    for (int w = 1; w < ELRA_NWARPS; ++w) m = op(m, red[w]);
    __syncthreads();  // red may be reused right after
    return m;
}

// Max that propagates NaN (any NaN partial makes the result NaN).
template <typename T> __device__ T block_max(T v, T* red) {
    return block_reduce_max(v, red, [](T a, T b) { return nan_max(a, b); });
}

// max(0, max of the non-NaN partials): the fold `if c > m { c } else { m }` from m = 0 of the
// CPU core, which skips NaN candidates whatever their position.
template <typename T> __device__ T block_max_ignore_nan(T v, T* red) {
    return block_reduce_max(v > T(0) ? v : T(0), red, [](T a, T b) { return b > a ? b : a; });
}

// Sums stay sequential in thread order (thread 0 adds the ELRA_BLOCK partials): a tree would
// change the rounding, and the CPU core fixes the order.
template <typename T> __device__ T block_sum(T v, T* red) {
    red[threadIdx.x] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        T s = red[0];
        for (int t = 1; t < ELRA_BLOCK; ++t) s += red[t];
        red[0] = s;
    }
    __syncthreads();
    T s = red[0];
    __syncthreads();
    return s;
}

// Logical OR of a per-thread flag over the block.
__device__ __forceinline__ bool block_any(bool flag) { return __syncthreads_or(flag ? 1 : 0) != 0; }

// C = A·B for n×n row-major matrices (C must not alias A or B). Each entry is one thread's
// dot product in index order k = 0..n-1 with FMA. Ends with a barrier.
template <typename T> __device__ void mat_mul(const T* A, const T* B, T* C, int n) {
    for (int idx = threadIdx.x; idx < n * n; idx += ELRA_BLOCK) {
        const int i = idx / n, j = idx - (idx / n) * n;
        T acc = T(0);
        for (int k = 0; k < n; ++k) acc = fma_(A[i * n + k], B[k * n + j], acc);
        C[idx] = acc;
    }
    __syncthreads();
}

// Y = X (n×n copy). Ends with a barrier.
template <typename T> __device__ void mat_copy(const T* X, T* Y, int n) {
    for (int idx = threadIdx.x; idx < n * n; idx += ELRA_BLOCK) Y[idx] = X[idx];
    __syncthreads();
}

// ‖X‖₁ = max_j Σ_i |X_ij| (n×n). Column sums in row order; NaN propagates. All threads get it.
template <typename T> __device__ T norm1(const T* X, int n, T* red) {
    T m = T(0);
    for (int j = threadIdx.x; j < n; j += ELRA_BLOCK) {
        T s = T(0);
        for (int i = 0; i < n; ++i) s += abs_(X[i * n + j]);
        m = nan_max(m, s);
    }
    return block_max(m, red);
}

// Whether every entry of the n×n matrix X is finite (all threads get the answer).
template <typename T> __device__ bool all_finite(const T* X, int n) {
    bool bad = false;
    for (int idx = threadIdx.x; idx < n * n; idx += ELRA_BLOCK) bad |= !finite_(X[idx]);
    return !block_any(bad);
}

}  // namespace elra
