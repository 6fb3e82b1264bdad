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

// Block-wide reductions. Every thread passes its partial value and receives the block result.
// `red` is a shared array of ELRA_BLOCK entries. Deterministic: thread 0 combines the partials
// in thread order, so the result never depends on scheduling.
template <typename T> __device__ T block_max(T v, T* red) {
    red[threadIdx.x] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        T m = red[0];
        for (int t = 1; t < ELRA_BLOCK; ++t) m = nan_max(m, red[t]);
        red[0] = m;
    }
    __syncthreads();
    T m = red[0];
    __syncthreads();  // red may be reused right after
    return m;
}

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
