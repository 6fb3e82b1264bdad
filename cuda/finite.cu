// Non-finite scan of a strided matrix: the GPU form of the overflow rule (src/ops/mod.rs
// `check_output` on the CPU). The host launch is src/cuda/skinny.rs `check_finite`; it serves the
// functional export `elra_gpu_check_finite` and the opt-in output check of the GPU layers.
//
// Kernel (entry points check_finite_{f32|f16|bf16}, T ∈ {float, __half, __nv_bfloat16}):
//   check_finite_T   *flag |= 1 when some X[i·ld + j], i < rows, j < cols, is NaN or ±Inf.
//
// The test is on the IEEE bits (the exponent field all ones), so it converts nothing and treats
// zeros, subnormals and the largest finite values alike. Entries j ≥ cols of a row (the padding of
// a row stride ld > cols) are never read. Grid (gx, gy): block (x, y) reads the rows i ≡ y
// (mod gy) and, in each, the chunks of V = 16 / sizeof(T) columns numbered x·ELRA_BLOCK + t,
// x·ELRA_BLOCK + t + gx·ELRA_BLOCK, … — one 16-byte load per chunk when X and ld allow it, V
// scalar loads otherwise and at a ragged end. The block ORs its threads' findings (one barrier)
// and one thread sets the bit with atomicOr only when something was found: a finite matrix costs
// one read and no write, the flag is never cleared (the caller zeroes it), and the host is never
// waited for.
#include "common.cuh"

#ifndef ELRA_EMULATE
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace elra {
namespace finite {

// The IEEE bit pattern of one element: its storage type and exponent field.
template <typename T> struct Bits;
template <> struct Bits<float> {
    using U = unsigned;
    static constexpr unsigned exp = 0x7f800000u;
};
template <> struct Bits<__half> {
    using U = unsigned short;
    static constexpr unsigned exp = 0x7c00u;
};
template <> struct Bits<__nv_bfloat16> {
    using U = unsigned short;
    static constexpr unsigned exp = 0x7f80u;
};

// Whether the element with bits `b` is NaN or ±Inf.
template <typename T> __device__ __forceinline__ bool nonfinite(unsigned b) {
    return (b & Bits<T>::exp) == Bits<T>::exp;
}

// Whether one of the 16 bytes at p (aligned to 16) holds a non-finite element of T.
template <typename T> __device__ __forceinline__ bool nonfinite16(const void* p) {
    unsigned w[4];
#ifdef ELRA_EMULATE
    std::memcpy(w, p, 16);
#else
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    w[0] = u.x, w[1] = u.y, w[2] = u.z, w[3] = u.w;
#endif
    bool bad = false;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        if constexpr (sizeof(T) == 4) {
            bad |= nonfinite<T>(w[e]);
        } else {
            bad |= nonfinite<T>(w[e] & 0xffffu) | nonfinite<T>(w[e] >> 16);
        }
    }
    return bad;
}

template <typename T>
__device__ void check_finite(long long rows, long long cols, const T* X, long long ld, unsigned* flag) {
    using U = typename Bits<T>::U;
    constexpr int V = 16 / (int)sizeof(T);
    const U* x = reinterpret_cast<const U*>(X);
    const bool vec = ((unsigned long long)(size_t)X & 15ull) == 0 && ld % V == 0;
    const long long step = (long long)gridDim.x * ELRA_BLOCK * V;
    bool bad = false;
    for (long long i = blockIdx.y; i < rows; i += gridDim.y) {
        const U* row = x + i * ld;
        for (long long j = ((long long)blockIdx.x * ELRA_BLOCK + threadIdx.x) * V; j < cols; j += step) {
            if (vec && cols - j >= V) {
                bad |= nonfinite16<T>(row + j);
            } else {
                const long long n = cols - j < V ? cols - j : V;
                for (long long e = 0; e < n; ++e) bad |= nonfinite<T>((unsigned)row[j + e]);
            }
        }
    }
    if (block_any(bad) && threadIdx.x == 0) atomicOr(flag, 1u);
}

}  // namespace finite
}  // namespace elra

#define ELRA_FINITE_ENTRY(T, SUFFIX)                                                                   \
    extern "C" __global__ void __launch_bounds__(ELRA_BLOCK)                                           \
        check_finite_##SUFFIX(long long rows, long long cols, const T* X, long long ld, unsigned* flag) { \
        elra::finite::check_finite<T>(rows, cols, X, ld, flag);                                        \
    }

ELRA_FINITE_ENTRY(float, f32)
ELRA_FINITE_ENTRY(__half, f16)
ELRA_FINITE_ENTRY(__nv_bfloat16, bf16)
