// Fused skinny kernels of the ELRA layer on the GPU (src/cuda/layer.rs): the passes over N×d and
// N×k activations and over the d×k weight that surround the cuBLAS GEMMs.
//
// Activations and weights are T ∈ {float, __half, __nv_bfloat16} (entry points `{op}_{f32|f16|bf16}`);
// adapter factors, skinny intermediates (N×r), r×r matrices and gradients are float. Every
// accumulation is in float with explicit fmaf (the build passes -fmad=false), in a fixed order, so
// results never depend on scheduling (no atomics: reductions over rows go through per-chunk
// partials summed in chunk order).
//
// Kernels:
//   rows_fused_T        one block per row i:  v = Cm·in_i,  t = Mm·v (or m_scale·v),
//                       out_i = base_i + Am·t  (Woodbury row pass, Prop. 1 / eq. 5; its reverse mode
//                       with transposed roles; LoRA's adapter branch; v-only skinny products).
//   col_reduce_partial_T / col_reduce_finish_f32
//                       out = α·Yᵀ S + β·out  (Y n_rows×n in T, S n_rows×r in float): the reductions
//                       over rows, e.g. ∂A = ∂Yᵀ T, P = C W0, ∂P = sᵀ x.
//   merge_apply_T       W_out = W_in + L R  (L d×r, R r×k float): the rank-r merge (eq. 30).
//   small_gemm_f32      C = α A B + β C for small float operands with arbitrary strides.
//   factor_c_f32        C = η m (α Aᵀ + (1−α) B)   (eq. 2, §4.2.1, eq. 19).
//   factor_backward_f32 energy gradient (eq. 20–21) and the chain through eq. 19 to (∂A, ∂B, ∂η).
//
// Matrices with explicit strides are indexed X[i*s0 + j*s1]; "ld" is a row stride (column stride 1).
// Null output pointers skip that output. Blocks have exactly ELRA_BLOCK threads (a power of two).
#include "common.cuh"

#ifndef ELRA_EMULATE
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace elra {
namespace skinny {

// Partial sums of at most GROUP outputs are kept per thread; larger r loops over groups.
#define ELRA_SKINNY_GROUP 8
// Largest rank the row kernel supports (v and t live in shared memory).
#define ELRA_SKINNY_MAX_R 64

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// Tree reduction of GROUP values per thread over the block, deterministic (fixed pairing).
// red is shared [GROUP][ELRA_BLOCK]. On return red[q][0] holds the block sum of acc[q]. Ends with a
// barrier; every thread must call it.
__device__ void tree_sum_group(const float* acc, float* red) {
    for (int q = 0; q < ELRA_SKINNY_GROUP; ++q) red[q * ELRA_BLOCK + threadIdx.x] = acc[q];
    __syncthreads();
    for (int s = ELRA_BLOCK / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) {
            for (int q = 0; q < ELRA_SKINNY_GROUP; ++q)
                red[q * ELRA_BLOCK + threadIdx.x] += red[q * ELRA_BLOCK + threadIdx.x + s];
        }
        __syncthreads();
    }
}

// One block per row i (blockIdx.x):
//   v_q   = Σ_l Cm[q, l] · in[i, l]                       q < r, l < n_in
//   t_q   = Σ_p Mm[q, p] · v_p   (Mm null: t = m_scale · v)
//   out[i, j] = base[i, j] + Σ_q Am[j, q] · t_q           j < n_out (skipped when out is null;
//                                                          base null reads as 0)
// v_out, t_out (n_rows × r, row-major) receive v and t when not null. `in`, `base` and `out` may
// alias: every read of `in` happens before the barrier that precedes the writes, and each base/out
// entry is read and written by the same thread.
template <typename T>
__device__ void rows_fused(int n_in, int n_out, int r, const T* in, long long ld_in, const T* base,
                           long long ld_base, T* out, long long ld_out, const float* Cm, long long cs0,
                           long long cs1, const float* Mm, long long ms0, long long ms1, float m_scale,
                           const float* Am, long long as0, long long as1, float* v_out, float* t_out) {
    __shared__ float red[ELRA_SKINNY_GROUP * ELRA_BLOCK];
    __shared__ float vs[ELRA_SKINNY_MAX_R], ts[ELRA_SKINNY_MAX_R];
    const long long i = blockIdx.x;
    const T* row = in + i * ld_in;
    for (int g = 0; g < r; g += ELRA_SKINNY_GROUP) {
        float acc[ELRA_SKINNY_GROUP];
        for (int q = 0; q < ELRA_SKINNY_GROUP; ++q) acc[q] = 0.0f;
        for (int l = threadIdx.x; l < n_in; l += ELRA_BLOCK) {
            const float x = to_f32(row[l]);
            for (int q = 0; q < ELRA_SKINNY_GROUP; ++q)
                if (g + q < r) acc[q] = fmaf(Cm[(long long)(g + q) * cs0 + (long long)l * cs1], x, acc[q]);
        }
        tree_sum_group(acc, red);
        if ((int)threadIdx.x < ELRA_SKINNY_GROUP && g + (int)threadIdx.x < r)
            vs[g + threadIdx.x] = red[threadIdx.x * ELRA_BLOCK];
        __syncthreads();
    }
    for (int q = threadIdx.x; q < r; q += ELRA_BLOCK) {
        float t;
        if (Mm) {
            t = 0.0f;
            for (int p = 0; p < r; ++p) t = fmaf(Mm[(long long)q * ms0 + (long long)p * ms1], vs[p], t);
        } else {
            t = m_scale * vs[q];
        }
        ts[q] = t;
        if (v_out) v_out[i * r + q] = vs[q];
        if (t_out) t_out[i * r + q] = t;
    }
    __syncthreads();
    if (!out) return;
    const T* brow = base ? base + i * ld_base : nullptr;
    T* orow = out + i * ld_out;
    for (int j = threadIdx.x; j < n_out; j += ELRA_BLOCK) {
        float acc = brow ? to_f32(brow[j]) : 0.0f;
        for (int q = 0; q < r; ++q) acc = fmaf(Am[(long long)j * as0 + (long long)q * as1], ts[q], acc);
        orow[j] = from_f32<T>(acc);
    }
}

// Grid (ceil(n / ELRA_BLOCK), n_chunks). Thread (column j, chunk c) sums
//   partial[(c·n + j)·r + q] = Σ_{i in chunk c} Y[i, j] · S[i·ss0 + q·ss1]
// over rows i ∈ [c·rows_per_chunk, min(n_rows, (c+1)·rows_per_chunk)), in row order.
template <typename T>
__device__ void col_reduce_partial(int n_rows, int n, int r, int rows_per_chunk, const T* Y, long long ldy,
                                   const float* S, long long ss0, long long ss1, float* partial) {
    const long long j = (long long)blockIdx.x * ELRA_BLOCK + threadIdx.x;
    const long long c = blockIdx.y;
    if (j >= n) return;
    const long long i0 = c * rows_per_chunk;
    const long long i1 = i0 + rows_per_chunk < n_rows ? i0 + rows_per_chunk : n_rows;
    for (int g = 0; g < r; g += ELRA_SKINNY_GROUP) {
        float acc[ELRA_SKINNY_GROUP];
        for (int q = 0; q < ELRA_SKINNY_GROUP; ++q) acc[q] = 0.0f;
        for (long long i = i0; i < i1; ++i) {
            const float y = to_f32(Y[i * ldy + j]);
            for (int q = 0; q < ELRA_SKINNY_GROUP; ++q)
                if (g + q < r) acc[q] = fmaf(y, S[i * ss0 + (long long)(g + q) * ss1], acc[q]);
        }
        for (int q = 0; q < ELRA_SKINNY_GROUP; ++q)
            if (g + q < r) partial[(c * n + j) * r + g + q] = acc[q];
    }
}

// out[j·os0 + q·os1] = alpha · Σ_c partial[(c·n + j)·r + q] (+ beta · out when beta ≠ 0; with
// beta = 0 the old value is not read), chunks summed in order. Grid ceil(n·r / ELRA_BLOCK).
__device__ void col_reduce_finish(int n, int r, int n_chunks, const float* partial, float alpha, float beta,
                                  float* out, long long os0, long long os1) {
    const long long idx = (long long)blockIdx.x * ELRA_BLOCK + threadIdx.x;
    if (idx >= (long long)n * r) return;
    const long long j = idx / r, q = idx - (idx / r) * r;
    float s = 0.0f;
    for (long long c = 0; c < n_chunks; ++c) s += partial[(c * n + j) * r + q];
    float* o = out + j * os0 + q * os1;
    *o = beta != 0.0f ? fmaf(alpha, s, beta * *o) : alpha * s;
}

// W_out[i, j] = W_in[i, j] + scale · Σ_q L[i·ls0 + q·ls1] · R[q·rs0 + j·rs1], accumulated in float
// and rounded once. Grid ceil(d·k / ELRA_BLOCK). W_out may alias W_in (same thread reads and writes).
template <typename T>
__device__ void merge_apply(int d, int k, int r, const T* W_in, long long ld_in, T* W_out, long long ld_out,
                            float scale, const float* L, long long ls0, long long ls1, const float* R,
                            long long rs0, long long rs1) {
    const long long idx = (long long)blockIdx.x * ELRA_BLOCK + threadIdx.x;
    if (idx >= (long long)d * k) return;
    const long long i = idx / k, j = idx - (idx / k) * k;
    float acc = 0.0f;
    for (int q = 0; q < r; ++q) acc = fmaf(L[i * ls0 + q * ls1], R[q * rs0 + j * rs1], acc);
    W_out[i * ld_out + j] = from_f32<T>(fmaf(scale, acc, to_f32(W_in[i * ld_in + j])));
}

}  // namespace skinny
}  // namespace elra

// ---- float-only helpers --------------------------------------------------------------------------

// C[i·cs0 + j·cs1] = alpha · Σ_p A[i·as0 + p·as1] B[p·bs0 + j·bs1] + beta · C (beta = 0: C not read).
// m×n output, inner dimension kk; one thread per entry, p in order. Grid ceil(m·n / ELRA_BLOCK).
extern "C" __global__ void __launch_bounds__(ELRA_BLOCK)
    small_gemm_f32(int m, int n, int kk, float alpha, const float* A, long long as0, long long as1, const float* B,
                   long long bs0, long long bs1, float beta, float* C, long long cs0, long long cs1) {
    const long long idx = (long long)blockIdx.x * ELRA_BLOCK + threadIdx.x;
    if (idx >= (long long)m * n) return;
    const long long i = idx / n, j = idx - (idx / n) * n;
    float s = 0.0f;
    for (long long p = 0; p < kk; ++p) s = fmaf(A[i * as0 + p * as1], B[p * bs0 + j * bs1], s);
    float* o = C + i * cs0 + j * cs1;
    *o = beta != 0.0f ? fmaf(alpha, s, beta * *o) : alpha * s;
}

// Cᵀ (d×r, stored transposed) of C = η_eff (α Aᵀ + (1−α) B), η_eff = eta[0] · mult (eq. 2,
// §4.2.1, eq. 19; B (r×d) null means the PSD variant, α = 1). Grid ceil(d·r / ELRA_BLOCK).
extern "C" __global__ void __launch_bounds__(ELRA_BLOCK)
    factor_c_f32(int d, int r, const float* A, const float* B, const float* eta, float mult, float alpha, float* Ct) {
    const long long idx = (long long)blockIdx.x * ELRA_BLOCK + threadIdx.x;
    if (idx >= (long long)d * r) return;
    const long long l = idx / r, q = idx - (idx / r) * r;
    const float eta_eff = eta[0] * mult;
    float c = B ? B[q * d + l] * (eta_eff * (1.0f - alpha)) : 0.0f;
    if (alpha > 0.0f) c = fmaf(eta_eff * alpha, A[idx], c);
    Ct[idx] = c;
}

// One block. Given Ā (d×r) and C̄ᵀ (d×r) of the effective factors (in place), A (d×r), Cᵀ (d×r)
// and the Grams S = AᵀA, K = CCᵀ (r×r):
//   energy (eq. 20–21, λ > 0):  Ā += 2λ A K,  C̄ᵀ += 2λ Cᵀ S   (S = AᵀA, K = CCᵀ, both symmetric)
//   chain (eq. 19, no clip):    ∂η = m ⟨C̄, C⟩ / η_eff,  Ā += η_eff α C̄ᵀ,  B̄ = η_eff (1−α) C̄
// (src/grad/generator.rs `energy_backward`, `FactorChain::backward`). B̄ null: PSD.
extern "C" __global__ void __launch_bounds__(ELRA_BLOCK)
    factor_backward_f32(int d, int r, const float* A, const float* Ct, const float* S, const float* K, float lambda,
                        float alpha, const float* eta, float mult, float* Abar, float* CbarT, float* Bbar,
                        float* etabar) {
    __shared__ float red[ELRA_BLOCK];
    const long long dr = (long long)d * r;
    if (lambda > 0.0f) {
        const float two_l = lambda + lambda;
        for (long long idx = threadIdx.x; idx < dr; idx += ELRA_BLOCK) {
            const long long l = idx / r, q = idx - (idx / r) * r;
            float ea = 0.0f, ec = 0.0f;
            for (int p = 0; p < r; ++p) {
                ea = fmaf(A[l * r + p], K[p * r + q], ea);
                ec = fmaf(Ct[l * r + p], S[p * r + q], ec);
            }
            Abar[idx] = fmaf(two_l, ea, Abar[idx]);
            CbarT[idx] = fmaf(two_l, ec, CbarT[idx]);
        }
        __syncthreads();
    }
    const float eta_eff = eta[0] * mult;
    float part = 0.0f;
    for (long long idx = threadIdx.x; idx < dr; idx += ELRA_BLOCK) {
        part = fmaf(CbarT[idx], Ct[idx], part);
    }
    const float dot = elra::block_sum(part, red);
    if (threadIdx.x == 0) etabar[0] = dot / eta_eff * mult;
    const float wa = eta_eff * alpha, wb = eta_eff * (1.0f - alpha);
    for (long long idx = threadIdx.x; idx < dr; idx += ELRA_BLOCK) {
        const long long l = idx / r, q = idx - (idx / r) * r;
        const float cb = CbarT[idx];
        if (alpha > 0.0f) Abar[idx] = fmaf(wa, cb, Abar[idx]);
        if (Bbar) Bbar[q * d + l] = wb * cb;
    }
}

extern "C" __global__ void __launch_bounds__(ELRA_BLOCK)
    col_reduce_finish_f32(int n, int r, int n_chunks, const float* partial, float alpha, float beta, float* out,
                          long long os0, long long os1) {
    elra::skinny::col_reduce_finish(n, r, n_chunks, partial, alpha, beta, out, os0, os1);
}

// ---- entry points per activation type: {op}_{f32|f16|bf16} --------------------------------------

#define ELRA_SKINNY_ENTRIES(T, SUFFIX)                                                                            \
    extern "C" __global__ void __launch_bounds__(ELRA_BLOCK) rows_fused_##SUFFIX(                                  \
        int n_in, int n_out, int r, const T* in, long long ld_in, const T* base, long long ld_base, T* out,        \
        long long ld_out, const float* Cm, long long cs0, long long cs1, const float* Mm, long long ms0,           \
        long long ms1, float m_scale, const float* Am, long long as0, long long as1, float* v_out, float* t_out) { \
        elra::skinny::rows_fused<T>(n_in, n_out, r, in, ld_in, base, ld_base, out, ld_out, Cm, cs0, cs1, Mm, ms0,  \
                                    ms1, m_scale, Am, as0, as1, v_out, t_out);                                     \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ELRA_BLOCK) col_reduce_partial_##SUFFIX(                          \
        int n_rows, int n, int r, int rows_per_chunk, const T* Y, long long ldy, const float* S, long long ss0,    \
        long long ss1, float* partial) {                                                                           \
        elra::skinny::col_reduce_partial<T>(n_rows, n, r, rows_per_chunk, Y, ldy, S, ss0, ss1, partial);           \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ELRA_BLOCK) merge_apply_##SUFFIX(                                 \
        int d, int k, int r, const T* W_in, long long ld_in, T* W_out, long long ld_out, float scale,              \
        const float* L, long long ls0, long long ls1, const float* R, long long rs0, long long rs1) {              \
        elra::skinny::merge_apply<T>(d, k, r, W_in, ld_in, W_out, ld_out, scale, L, ls0, ls1, R, rs0, rs1);        \
    }

ELRA_SKINNY_ENTRIES(float, f32)
ELRA_SKINNY_ENTRIES(__half, f16)
ELRA_SKINNY_ENTRIES(__nv_bfloat16, bf16)
