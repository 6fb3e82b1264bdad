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
//   rows_fused_T        per row i (a warp owns 1, 2 or 4 rows; grid-stride over rows):
//                       v = Cm·in_i,  t = Mm·v (or m_scale·v), out_i = base_i + Am·t  (Woodbury row
//                       pass, Prop. 1 / eq. 5; its reverse mode with transposed roles; LoRA's
//                       adapter branch; v-only skinny products).
//   col_reduce_partial_T / col_reduce_finish_f32
//                       out = α·Yᵀ S + β·out  (Y n_rows×n in T, S n_rows×r in float): the reductions
//                       over rows, e.g. ∂A = ∂Yᵀ T, P = C W0, ∂P = sᵀ x.
//   merge_apply_T       W_out = W_in + L R  (L d×r, R r×k float): the rank-r merge (eq. 30).
//   small_gemm_f32      C = α A B + β C for small float operands with arbitrary strides.
//   factor_c_f32        C = η m (α Aᵀ + (1−α) B)   (eq. 2, §4.2.1, eq. 19).
//   factor_backward_f32 energy gradient (eq. 20–21) and the chain through eq. 19 to (∂A, ∂B);
//   factor_eta_f32      ∂η of eq. 19 (one block).
//   The multi-adapter forward (src/cuda/ops/multi.rs): multi_count_i32 / multi_perm_i32 (rows per
//                       adapter, stable segments and the row permutation, one block per adapter),
//                       multi_prep_f32 (Cᵀ and Z = C A of up to 8 adapters per launch),
//                       rows_multi_T (the row pass over each adapter's segment through a row map,
//                       8 adapters per launch), multi_finish_T (bias; NaN rows for bad indices).
//
// Matrices with explicit strides are indexed X[i*s0 + j*s1]; "ld" is a row stride (column stride 1).
// Null output pointers skip that output. Blocks have exactly ELRA_BLOCK threads (a power of two).
// The passes over activations and weights are built for bandwidth: 8/16-byte vector accesses
// where the pointer and the row stride allow (a scalar path otherwise and for ragged ends),
// several independent loads in flight per thread, and the small operands (Cm, Am, S, R) staged
// in shared memory in a canonical layout whatever their strides, each value serving several rows.
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
// Largest number of rows one warp of the row kernel processes at once (register blocking).
#define ELRA_SKINNY_MAX_RPW 4
// 8-element chunks per lane in one column tile of the row kernel: a tile is
// ELRA_WARP · 8 · TILE_CHUNKS columns (1024 on the GPU), staged in shared memory for GROUP ranks.
#ifndef ELRA_SKINNY_TILE_CHUNKS
#define ELRA_SKINNY_TILE_CHUNKS 4
#endif
#define ELRA_SKINNY_TC (ELRA_WARP * 8 * ELRA_SKINNY_TILE_CHUNKS)
// Column reduction: columns per thread, row lanes per block (warps on the GPU), column threads
// per block, rows of S staged per piece, rows in flight per thread.
#define ELRA_CR_V 4
#define ELRA_CR_RL (ELRA_BLOCK >= 64 ? 8 : 2)
#define ELRA_CR_CT (ELRA_BLOCK / ELRA_CR_RL)
#define ELRA_CR_COLS (ELRA_CR_CT * ELRA_CR_V)
#define ELRA_CR_SROWS (ELRA_CR_RL * 16)
#define ELRA_CR_U 4
// Merge: columns per lane and rows per warp (a block covers ELRA_WARP · 4 columns and
// ELRA_NWARPS · 4 rows per step).
#define ELRA_MA_V 4
#define ELRA_MA_RW 4
#define ELRA_MA_COLS (ELRA_WARP * ELRA_MA_V)

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// ---- vector access -------------------------------------------------------------------------------
// A chunk of V consecutive elements is moved as V·sizeof(T) bytes (8 or 16) when the address is
// aligned to that size; element e of the chunk is 16-bit half e%2 (little end first) of word e/2,
// or word e for float.

// Elements per 16-byte access.
template <typename T> struct Vec16 {
    static constexpr int n = 16 / (int)sizeof(T);
};

template <int W> __device__ __forceinline__ void ld_words(const void* p, unsigned* w) {
#ifdef ELRA_EMULATE
    std::memcpy(w, p, 4 * W);
#else
    if constexpr (W == 4) {
        const uint4 u = *reinterpret_cast<const uint4*>(p);
        w[0] = u.x, w[1] = u.y, w[2] = u.z, w[3] = u.w;
    } else if constexpr (W == 2) {
        const uint2 u = *reinterpret_cast<const uint2*>(p);
        w[0] = u.x, w[1] = u.y;
    } else {
        static_assert(W == 1, "1, 2 or 4 words");
        w[0] = *reinterpret_cast<const unsigned*>(p);
    }
#endif
}

template <int W> __device__ __forceinline__ void st_words(void* p, const unsigned* w) {
#ifdef ELRA_EMULATE
    std::memcpy(p, w, 4 * W);
#else
    if constexpr (W == 4) {
        *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
    } else if constexpr (W == 2) {
        *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
    } else {
        static_assert(W == 1, "1, 2 or 4 words");
        *reinterpret_cast<unsigned*>(p) = w[0];
    }
#endif
}

__device__ __forceinline__ float bits_to_f32(float*, unsigned b) { return __uint_as_float(b); }
__device__ __forceinline__ float bits_to_f32(__half*, unsigned b) {
    return __half2float(__ushort_as_half((unsigned short)b));
}
__device__ __forceinline__ float bits_to_f32(__nv_bfloat16*, unsigned b) { return __uint_as_float(b << 16); }
__device__ __forceinline__ unsigned f32_to_bits(float*, float x) { return __float_as_uint(x); }
__device__ __forceinline__ unsigned f32_to_bits(__half*, float x) {
    return (unsigned)__half_as_ushort(__float2half_rn(x));
}
__device__ __forceinline__ unsigned f32_to_bits(__nv_bfloat16*, float x) {
    return (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(x));
}

// Whether p is aligned to `bytes` (a power of two).
__device__ __forceinline__ bool aligned(const void* p, int bytes) {
    return ((unsigned long long)(size_t)p & (unsigned long long)(bytes - 1)) == 0;
}

// x[e] = p[e] for e < min(V, avail), 0 beyond. `vec`: p is aligned to V·sizeof(T) bytes, so a
// full chunk is one vector load.
template <typename T, int V> __device__ __forceinline__ void load_chunk(const T* p, int avail, bool vec, float* x) {
    constexpr int W = V * (int)sizeof(T) / 4;
    if (vec && avail >= V) {
        unsigned w[W];
        ld_words<W>(p, w);
        if constexpr (sizeof(T) == 4) {
#pragma unroll
            for (int e = 0; e < V; ++e) x[e] = bits_to_f32((T*)nullptr, w[e]);
        } else {
#pragma unroll
            for (int e = 0; e < W; ++e) {
                x[2 * e] = bits_to_f32((T*)nullptr, w[e] & 0xffffu);
                x[2 * e + 1] = bits_to_f32((T*)nullptr, w[e] >> 16);
            }
        }
    } else {
#pragma unroll
        for (int e = 0; e < V; ++e) x[e] = e < avail ? to_f32(p[e]) : 0.0f;
    }
}

// p[e] = x[e] rounded to T for e < min(V, avail).
template <typename T, int V> __device__ __forceinline__ void store_chunk(T* p, int avail, bool vec, const float* x) {
    constexpr int W = V * (int)sizeof(T) / 4;
    if (vec && avail >= V) {
        unsigned w[W];
        if constexpr (sizeof(T) == 4) {
#pragma unroll
            for (int e = 0; e < V; ++e) w[e] = f32_to_bits((T*)nullptr, x[e]);
        } else {
#pragma unroll
            for (int e = 0; e < W; ++e)
                w[e] = f32_to_bits((T*)nullptr, x[2 * e]) | (f32_to_bits((T*)nullptr, x[2 * e + 1]) << 16);
        }
        st_words<W>(p, w);
    } else {
#pragma unroll
        for (int e = 0; e < V; ++e)
            if (e < avail) p[e] = from_f32<T>(x[e]);
    }
}

// o[0..4) = p[0..4) from 16-byte aligned shared memory.
__device__ __forceinline__ void ld_f4(const float* p, float* o) {
#ifdef ELRA_EMULATE
    o[0] = p[0], o[1] = p[1], o[2] = p[2], o[3] = p[3];
#else
    const float4 v = *reinterpret_cast<const float4*>(p);
    o[0] = v.x, o[1] = v.y, o[2] = v.z, o[3] = v.w;
#endif
}

// Sum over the lanes of a warp by an xor butterfly. Every lane gets the same value (each step
// adds the same two operands on both partners; float addition is commutative), and the order
// is fixed. Every lane of the warp must call it.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = ELRA_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Position of column c of a shared tile row of `width` columns (a multiple of V) holding V-column
// chunks: the V/4 float4 quarters of a chunk are stored `width / (V/4)` apart, so the float4
// reads of consecutive lanes are consecutive (no bank conflicts).
template <int V> __device__ __forceinline__ int tile_pos(int c, int width) {
    return ((c % V) / 4) * (width / (V / 4)) + (c / V) * 4 + (c % 4);
}

// ---- rows_fused ----------------------------------------------------------------------------------
// Each warp owns RW consecutive rows; a block owns ELRA_NWARPS·RW rows per step of a grid-stride
// loop over rows. For one step, per row i of the warp:
//   v_q   = Σ_l Cm[q, l] · in[i, l]                       q < r, l < n_in
//   t_q   = Σ_p Mm[q, p] · v_p   (Mm null: t = m_scale · v)
//   out[i, j] = base[i, j] + Σ_q Am[j, q] · t_q           j < n_out (skipped when out is null;
//                                                          base null reads as 0)
// Phase 1 walks column tiles of TC columns; per tile and group of GROUP ranks the block stages
// Cm[g.., tile] in shared memory (any strides; zero-padded), and each lane accumulates, for its
// V-column chunks (one 8/16-byte load per row when aligned), RW × GROUP partial dot products in
// registers (each Cm value read from shared memory serves RW rows). Partials are summed over the
// warp by a butterfly; with one group they stay in registers across tiles and are reduced once.
// Phase 2 stages Am for all r ranks over column tiles of TC / n_groups columns and each lane
// writes its chunks of out = base + Am t (t read from shared memory), RW rows at a time.
// Summation orders are fixed (per lane in column order, then the butterfly, then tiles in order).
// `in`, `base` and `out` may alias (in place): a row is read only by the warp that owns it,
// entirely in phase 1, before the barriers that precede its phase-2 writes; each base/out chunk
// is read and then written by one lane.
template <typename T, int RW>
__device__ void rows_fused_rw(int n_rows, int n_in, int n_out, int r, const T* in, long long ld_in, const T* base,
                              long long ld_base, T* out, long long ld_out, const float* Cm, long long cs0,
                              long long cs1, const float* Mm, long long ms0, long long ms1, float m_scale,
                              const float* Am, long long as0, long long as1, float* v_out, float* t_out, float* tile,
                              float* vsh, float* tsh, const int* rmap, long long blk, long long nblk) {
    constexpr int V = Vec16<T>::n, VQ = V / 4, G = ELRA_SKINNY_GROUP, TC = ELRA_SKINNY_TC, MR = ELRA_SKINNY_MAX_R;
    constexpr int CPL = TC / (V * ELRA_WARP);  // chunks per lane and tile
    const int lane = threadIdx.x % ELRA_WARP, warp = threadIdx.x / ELRA_WARP;
    const int n_groups = (r + G - 1) / G;
    const bool vec_in = aligned(in, 16) && ld_in % V == 0;
    const bool vec_out =
        out && aligned(out, 16) && ld_out % V == 0 && (!base || (aligned(base, 16) && ld_base % V == 0));
    // Phase-2 tile width: r ranks × TCo columns fit the GROUP × TC tile; a multiple of V.
    const int TCo = (TC / n_groups) / V * V;
    float* vs = vsh + warp * ELRA_SKINNY_MAX_RPW * MR;
    float* ts = tsh + warp * ELRA_SKINNY_MAX_RPW * MR;
    const long long step = (long long)ELRA_NWARPS * RW;
    // Row i of the pass is row rmap[i] of in/base/out (i itself without a map); v_out/t_out keep
    // the pass's order.
    auto row = [rmap](long long i) -> long long { return rmap ? (long long)rmap[i] : i; };
    for (long long row0 = blk * step; row0 < n_rows; row0 += nblk * step) {
        const long long wrow = row0 + (long long)warp * RW;
        const int nr = wrow >= n_rows ? 0 : (n_rows - wrow < RW ? (int)(n_rows - wrow) : RW);
        // ---- phase 1: v = Cm in_i ----
        float acc[RW][G];
#pragma unroll
        for (int k = 0; k < RW; ++k)
#pragma unroll
            for (int q = 0; q < G; ++q) acc[k][q] = 0.0f;
        for (int t0 = 0; t0 < n_in; t0 += TC) {
            const int tw = n_in - t0 < TC ? n_in - t0 : TC;
            for (int g = 0; g < r; g += G) {
                const int gq = r - g < G ? r - g : G;
                __syncthreads();  // every warp is done with the previous tile
                for (int e = threadIdx.x; e < G * TC; e += ELRA_BLOCK) {
                    int q, c;
                    if (cs1 == 1) {
                        q = e / TC, c = e - (e / TC) * TC;
                    } else {
                        c = e / G, q = e - (e / G) * G;
                    }
                    tile[q * TC + tile_pos<V>(c, TC)] =
                        (q < gq && c < tw) ? Cm[(long long)(g + q) * cs0 + (long long)(t0 + c) * cs1] : 0.0f;
                }
                __syncthreads();
#pragma unroll 1
                for (int s = 0; s < CPL; ++s) {
                    const int c = (lane + s * ELRA_WARP) * V;
                    if (c < tw) {
                        float x[RW][V];
#pragma unroll
                        for (int k = 0; k < RW; ++k) {
                            if (k < nr)
                                load_chunk<T, V>(in + row(wrow + k) * ld_in + t0 + c, tw - c, vec_in, x[k]);
                            else
#pragma unroll
                                for (int e = 0; e < V; ++e) x[k][e] = 0.0f;
                        }
#pragma unroll
                        for (int q = 0; q < G; ++q) {
                            float cv[V];
#pragma unroll
                            for (int h = 0; h < VQ; ++h) ld_f4(tile + q * TC + h * (TC / VQ) + (c / V) * 4, cv + 4 * h);
#pragma unroll
                            for (int k = 0; k < RW; ++k)
#pragma unroll
                                for (int e = 0; e < V; ++e) acc[k][q] = fmaf(cv[e], x[k][e], acc[k][q]);
                        }
                    }
                }
                if (n_groups > 1 || t0 + TC >= n_in) {
                    const bool assign = n_groups == 1 || t0 == 0;
#pragma unroll
                    for (int k = 0; k < RW; ++k)
#pragma unroll
                        for (int q = 0; q < G; ++q) {
                            const float s = warp_sum(acc[k][q]);
                            acc[k][q] = 0.0f;
                            if (lane == 0 && q < gq) vs[k * MR + g + q] = assign ? s : vs[k * MR + g + q] + s;
                        }
                }
            }
        }
        __syncwarp();  // lane 0's v visible to the warp
        // ---- t = Mm v ----
        for (int idx = lane; idx < RW * r; idx += ELRA_WARP) {
            const int k = idx / r, q = idx - (idx / r) * r;
            float t;
            if (Mm) {
                t = 0.0f;
                for (int p = 0; p < r; ++p) t = fmaf(Mm[(long long)q * ms0 + (long long)p * ms1], vs[k * MR + p], t);
            } else {
                t = m_scale * vs[k * MR + q];
            }
            ts[k * MR + q] = t;
            if (k < nr) {
                if (v_out) v_out[(wrow + k) * r + q] = vs[k * MR + q];
                if (t_out) t_out[(wrow + k) * r + q] = t;
            }
        }
        __syncwarp();  // t visible to the warp; vs may be rewritten by the next step
        if (!out) continue;
        // ---- phase 2: out_i = base_i + Am t ----
        for (int t0 = 0; t0 < n_out; t0 += TCo) {
            const int tw = n_out - t0 < TCo ? n_out - t0 : TCo;
            __syncthreads();  // every warp is done with the previous tile
            for (int e = threadIdx.x; e < r * TCo; e += ELRA_BLOCK) {
                int q, c;
                if (as0 == 1) {
                    q = e / TCo, c = e - (e / TCo) * TCo;
                } else {
                    c = e / r, q = e - (e / r) * r;
                }
                tile[q * TCo + tile_pos<V>(c, TCo)] =
                    c < tw ? Am[(long long)(t0 + c) * as0 + (long long)q * as1] : 0.0f;
            }
            __syncthreads();
            for (int c = lane * V; c < tw; c += ELRA_WARP * V) {
                float y[RW][V];
#pragma unroll
                for (int k = 0; k < RW; ++k) {
                    if (k < nr && base)
                        load_chunk<T, V>(base + row(wrow + k) * ld_base + t0 + c, tw - c, vec_out, y[k]);
                    else
#pragma unroll
                        for (int e = 0; e < V; ++e) y[k][e] = 0.0f;
                }
                for (int q = 0; q < r; ++q) {
                    float a[V];
#pragma unroll
                    for (int h = 0; h < VQ; ++h) ld_f4(tile + q * TCo + h * (TCo / VQ) + (c / V) * 4, a + 4 * h);
#pragma unroll
                    for (int k = 0; k < RW; ++k) {
                        const float tq = ts[k * MR + q];
#pragma unroll
                        for (int e = 0; e < V; ++e) y[k][e] = fmaf(a[e], tq, y[k][e]);
                    }
                }
#pragma unroll
                for (int k = 0; k < RW; ++k)
                    if (k < nr) store_chunk<T, V>(out + row(wrow + k) * ld_out + t0 + c, tw - c, vec_out, y[k]);
            }
        }
    }
}

// The row pass with `rows_per_warp` ∈ {1, 2, 4} rows per warp (results do not depend on it: each
// row's sums are formed in the same order). Every thread of the block must call it.
template <typename T>
__device__ void rows_fused(int n_rows, int rows_per_warp, int n_in, int n_out, int r, const T* in, long long ld_in,
                           const T* base, long long ld_base, T* out, long long ld_out, const float* Cm, long long cs0,
                           long long cs1, const float* Mm, long long ms0, long long ms1, float m_scale,
                           const float* Am, long long as0, long long as1, float* v_out, float* t_out) {
    __align__(16) __shared__ float tile[ELRA_SKINNY_GROUP * ELRA_SKINNY_TC];
    __shared__ float vsh[ELRA_NWARPS * ELRA_SKINNY_MAX_RPW * ELRA_SKINNY_MAX_R];
    __shared__ float tsh[ELRA_NWARPS * ELRA_SKINNY_MAX_RPW * ELRA_SKINNY_MAX_R];
    if (rows_per_warp >= 4)
        rows_fused_rw<T, 4>(n_rows, n_in, n_out, r, in, ld_in, base, ld_base, out, ld_out, Cm, cs0, cs1, Mm, ms0, ms1,
                            m_scale, Am, as0, as1, v_out, t_out, tile, vsh, tsh, nullptr, blockIdx.x, gridDim.x);
    else if (rows_per_warp == 2)
        rows_fused_rw<T, 2>(n_rows, n_in, n_out, r, in, ld_in, base, ld_base, out, ld_out, Cm, cs0, cs1, Mm, ms0, ms1,
                            m_scale, Am, as0, as1, v_out, t_out, tile, vsh, tsh, nullptr, blockIdx.x, gridDim.x);
    else
        rows_fused_rw<T, 1>(n_rows, n_in, n_out, r, in, ld_in, base, ld_base, out, ld_out, Cm, cs0, cs1, Mm, ms0, ms1,
                            m_scale, Am, as0, as1, v_out, t_out, tile, vsh, tsh, nullptr, blockIdx.x, gridDim.x);
}

// ---- rows_multi: many adapters of one layer in one batch -----------------------------------------
// Launch batches of at most ELRA_MULTI_PER_LAUNCH adapters, passed by value. Block (x, y) serves
// adapter p.a[y]: the rows of its segment, perm[seg[a] .. seg[a+1]) (multi_perm_i32), through
// rows_fused_rw with that row map, blocks x = 0 … gridDim.x−1 striding over them. ELRA rows read
// the base output u from y itself and add A φ1(Z) (C u) in place (eq. 5 on the base output,
// Prop. 1: Cm = C from Cᵀ, Mm = M, Am = A); LoRA rows read x and add s·B (A x) (Cm = lora_A,
// Mm null with m_scale = s, Am = lora_B). Each row belongs to one segment, so no two blocks
// touch the same row of y.
#define ELRA_MULTI_PER_LAUNCH 8
struct MultiRowsAdapter {
    const float* cm;
    long long cs0, cs1;
    const float* mm;
    long long ms0, ms1;
    float m_scale;
    const float* am;
    long long as0, as1;
    int adapter;  // index into seg
    int r;
    int from_x;  // 1: the input rows are x's (LoRA), 0: y's (ELRA)
};
struct MultiRowsBatch {
    int count;
    MultiRowsAdapter a[ELRA_MULTI_PER_LAUNCH];
};

template <typename T>
__device__ void rows_multi(const MultiRowsBatch& p, const int* seg, const int* perm, int rows_per_warp, int d, int k,
                           const T* x, long long ld_x, T* y, long long ld_y) {
    __align__(16) __shared__ float tile[ELRA_SKINNY_GROUP * ELRA_SKINNY_TC];
    __shared__ float vsh[ELRA_NWARPS * ELRA_SKINNY_MAX_RPW * ELRA_SKINNY_MAX_R];
    __shared__ float tsh[ELRA_NWARPS * ELRA_SKINNY_MAX_RPW * ELRA_SKINNY_MAX_R];
    if ((int)blockIdx.y >= p.count) return;  // uniform over the block
    const MultiRowsAdapter& m = p.a[blockIdx.y];
    const int s0 = seg[m.adapter], n_a = seg[m.adapter + 1] - s0;
    if (n_a <= 0) return;
    const T* in = m.from_x ? x : y;
    const long long ld_in = m.from_x ? ld_x : ld_y;
    const int n_in = m.from_x ? k : d;
    const int* rmap = perm + s0;
    if (rows_per_warp >= 4)
        rows_fused_rw<T, 4>(n_a, n_in, d, m.r, in, ld_in, y, ld_y, y, ld_y, m.cm, m.cs0, m.cs1, m.mm, m.ms0, m.ms1,
                            m.m_scale, m.am, m.as0, m.as1, nullptr, nullptr, tile, vsh, tsh, rmap, blockIdx.x,
                            gridDim.x);
    else if (rows_per_warp == 2)
        rows_fused_rw<T, 2>(n_a, n_in, d, m.r, in, ld_in, y, ld_y, y, ld_y, m.cm, m.cs0, m.cs1, m.mm, m.ms0, m.ms1,
                            m.m_scale, m.am, m.as0, m.as1, nullptr, nullptr, tile, vsh, tsh, rmap, blockIdx.x,
                            gridDim.x);
    else
        rows_fused_rw<T, 1>(n_a, n_in, d, m.r, in, ld_in, y, ld_y, y, ld_y, m.cm, m.cs0, m.cs1, m.mm, m.ms0, m.ms1,
                            m.m_scale, m.am, m.as0, m.as1, nullptr, nullptr, tile, vsh, tsh, rmap, blockIdx.x,
                            gridDim.x);
}

// y[i, j] += bias[j] (bias may be null) for the rows with a valid adapter index, and NaN for the
// rows whose index lies outside [−1, count) — the device's way of reporting a bad index without
// a host wait (module docs of src/cuda/ops). Grid-stride over the n·d entries.
template <typename T>
__device__ void multi_finish(int n, int d, T* y, long long ld_y, const T* bias, const int* index, int count) {
    const long long total = (long long)n * d;
    for (long long e = (long long)blockIdx.x * ELRA_BLOCK + threadIdx.x; e < total;
         e += (long long)gridDim.x * ELRA_BLOCK) {
        const long long i = e / d, j = e - (e / d) * d;
        const int a = index[i];
        T* p = y + i * ld_y + j;
        if (a < -1 || a >= count)
            *p = from_f32<T>(quiet_nan<float>());
        else if (bias)
            *p = from_f32<T>(to_f32(*p) + to_f32(bias[j]));
    }
}

// ---- col_reduce ----------------------------------------------------------------------------------
// Grid (ceil(n / COLS), n_chunks), COLS = CT·V columns per block. Block (x, chunk c) computes
//   partial[(c·n + j)·r + q] = Σ_{i in chunk c} Y[i, j] · S[i·ss0 + q·ss1]
// for its COLS columns j over rows i ∈ [c·rows_per_chunk, min(n_rows, (c+1)·rows_per_chunk)).
// Thread (row lane rl, column thread ct) owns V consecutive columns (one 8/16-byte load per row
// when aligned) and the rows rl, rl + RL, … of each piece of SROWS rows, U rows in flight; S for
// a piece is staged in shared memory. The RL per-thread partials are then summed in row-lane
// order through shared memory. Per (j, q) the order is fixed: each row lane's rows in order,
// then row lanes 0..RL-1. r > GROUP loops over groups of ranks (re-reading Y).
template <typename T>
__device__ void col_reduce_partial(int n_rows, int n, int r, int rows_per_chunk, const T* Y, long long ldy,
                                   const float* S, long long ss0, long long ss1, float* partial) {
    constexpr int V = ELRA_CR_V, G = ELRA_SKINNY_GROUP, RL = ELRA_CR_RL, CT = ELRA_CR_CT, U = ELRA_CR_U;
    constexpr int SR = ELRA_CR_SROWS, VG1 = V * G + 1;
    __align__(16) __shared__ float ssh[SR * G];
    __shared__ float red[RL * CT * VG1];
    const int ct = threadIdx.x % CT, rl = threadIdx.x / CT;
    const long long c = blockIdx.y;
    const int jb = blockIdx.x * ELRA_CR_COLS;  // first column of the block
    const int j0 = jb + ct * V;
    const int avail = n - j0;  // columns of this thread's chunk inside the matrix (≤ 0: none)
    const bool vec = aligned(Y, V * (int)sizeof(T)) && ldy % V == 0;
    const long long i0 = c * rows_per_chunk;
    const long long i1 = i0 + rows_per_chunk < n_rows ? i0 + rows_per_chunk : n_rows;
    for (int g = 0; g < r; g += G) {
        const int gq = r - g < G ? r - g : G;
        float acc[V][G];
#pragma unroll
        for (int e = 0; e < V; ++e)
#pragma unroll
            for (int q = 0; q < G; ++q) acc[e][q] = 0.0f;
        for (long long p0 = i0; p0 < i1; p0 += SR) {
            const int pr = i1 - p0 < SR ? (int)(i1 - p0) : SR;
            __syncthreads();  // the previous piece is consumed
            for (int e = threadIdx.x; e < SR * G; e += ELRA_BLOCK) {
                int i, q;
                if (ss1 == 1) {
                    i = e / G, q = e - (e / G) * G;
                } else {
                    q = e / SR, i = e - (e / SR) * SR;
                }
                ssh[i * G + q] = (i < pr && q < gq) ? S[(p0 + i) * ss0 + (long long)(g + q) * ss1] : 0.0f;
            }
            __syncthreads();
            if (avail > 0) {
                for (int i = rl; i < pr; i += RL * U) {
                    float y[U][V];
#pragma unroll
                    for (int u = 0; u < U; ++u) {
                        const int ii = i + u * RL;
                        if (ii < pr)
                            load_chunk<T, V>(Y + (p0 + ii) * ldy + j0, avail, vec, y[u]);
                        else
#pragma unroll
                            for (int e = 0; e < V; ++e) y[u][e] = 0.0f;
                    }
#pragma unroll
                    for (int u = 0; u < U; ++u) {
                        const int ii = i + u * RL;
                        if (ii < pr) {
                            float s[G];
#pragma unroll
                            for (int h = 0; h < G / 4; ++h) ld_f4(ssh + ii * G + 4 * h, s + 4 * h);
#pragma unroll
                            for (int e = 0; e < V; ++e)
#pragma unroll
                                for (int q = 0; q < G; ++q) acc[e][q] = fmaf(y[u][e], s[q], acc[e][q]);
                        }
                    }
                }
            }
        }
        __syncthreads();  // red is free (previous group's sums read)
#pragma unroll
        for (int e = 0; e < V; ++e)
#pragma unroll
            for (int q = 0; q < G; ++q) red[(rl * CT + ct) * VG1 + e * G + q] = acc[e][q];
        __syncthreads();
        for (int idx = threadIdx.x; idx < CT * V * G; idx += ELRA_BLOCK) {
            const int ct2 = idx / (V * G), rem = idx - (idx / (V * G)) * (V * G);
            const int e = rem / G, q = rem - (rem / G) * G;
            float s = red[ct2 * VG1 + rem];
            for (int l = 1; l < RL; ++l) s += red[(l * CT + ct2) * VG1 + rem];
            const long long j = (long long)jb + ct2 * V + e;
            if (j < n && q < gq) partial[(c * n + j) * r + g + q] = s;
        }
    }
}

// out[j·os0 + q·os1] = alpha · Σ_c partial[(c·n + j)·r + q] (+ beta · out when beta ≠ 0; with
// beta = 0 the old value is not read), chunks summed in order. Grid ceil(n·r / ELRA_BLOCK).
__device__ void col_reduce_finish(int n, int r, int n_chunks, const float* partial, float alpha, float beta,
                                  float* out, long long os0, long long os1) {
    const long long idx = (long long)blockIdx.x * ELRA_BLOCK + threadIdx.x;
    if (idx >= (long long)n * r) return;
    const long long j = idx / r, q = idx - (idx / r) * r;
    const long long nr = (long long)n * r;
    float s = 0.0f;
#pragma unroll 8
    for (long long c = 0; c < n_chunks; ++c) s += partial[c * nr + idx];
    float* o = out + j * os0 + q * os1;
    *o = beta != 0.0f ? fmaf(alpha, s, beta * *o) : alpha * s;
}

// ---- merge_apply ---------------------------------------------------------------------------------
// W_out[i, j] = W_in[i, j] + scale · Σ_q L[i·ls0 + q·ls1] · R[q·rs0 + j·rs1], accumulated in float
// (q in order) and rounded once. Grid (ceil(k / COLS), any y), COLS = ELRA_WARP·V: block x stages
// R[:, its COLS columns] in shared memory once, then steps over row groups of ELRA_NWARPS·RW rows
// (grid-stride in y); each lane owns V consecutive columns (one vector load/store when aligned)
// of RW rows, each R value read from shared memory serving RW rows. W_out may alias W_in (each
// entry is read and then written by the same lane).
template <typename T>
__device__ void merge_apply(int d, int k, int r, const T* W_in, long long ld_in, T* W_out, long long ld_out,
                            float scale, const float* L, long long ls0, long long ls1, const float* R, long long rs0,
                            long long rs1) {
    constexpr int V = ELRA_MA_V, RW = ELRA_MA_RW, COLS = ELRA_MA_COLS;
    __align__(16) __shared__ float rsh[ELRA_SKINNY_MAX_R * COLS];
    const int lane = threadIdx.x % ELRA_WARP, warp = threadIdx.x / ELRA_WARP;
    const int jb = blockIdx.x * COLS;
    const int tw = k - jb < COLS ? k - jb : COLS;
    for (int e = threadIdx.x; e < r * COLS; e += ELRA_BLOCK) {
        int q, c;
        if (rs1 == 1) {
            q = e / COLS, c = e - (e / COLS) * COLS;
        } else {
            c = e / r, q = e - (e / r) * r;
        }
        rsh[q * COLS + c] = c < tw ? R[(long long)q * rs0 + (long long)(jb + c) * rs1] : 0.0f;
    }
    __syncthreads();
    const int c = lane * V;
    if (c >= tw) return;  // no barrier follows
    const int bytes = V * (int)sizeof(T);
    const bool vec = aligned(W_in, bytes) && aligned(W_out, bytes) && ld_in % V == 0 && ld_out % V == 0;
    const long long step = (long long)ELRA_NWARPS * RW;
    for (long long i0 = (long long)blockIdx.y * step + (long long)warp * RW; i0 < d; i0 += (long long)gridDim.y * step) {
        const int nr = d - i0 < RW ? (int)(d - i0) : RW;
        float w[RW][V], acc[RW][V];
#pragma unroll
        for (int kk = 0; kk < RW; ++kk) {
            if (kk < nr) load_chunk<T, V>(W_in + (i0 + kk) * ld_in + jb + c, tw - c, vec, w[kk]);
#pragma unroll
            for (int e = 0; e < V; ++e) acc[kk][e] = 0.0f;
        }
        for (int q = 0; q < r; ++q) {
            float rv[V];
            ld_f4(rsh + q * COLS + c, rv);
#pragma unroll
            for (int kk = 0; kk < RW; ++kk) {
                const float l = kk < nr ? L[(i0 + kk) * ls0 + (long long)q * ls1] : 0.0f;
#pragma unroll
                for (int e = 0; e < V; ++e) acc[kk][e] = fmaf(l, rv[e], acc[kk][e]);
            }
        }
#pragma unroll
        for (int kk = 0; kk < RW; ++kk) {
            if (kk < nr) {
                float o[V];
#pragma unroll
                for (int e = 0; e < V; ++e) o[e] = fmaf(scale, acc[kk][e], w[kk][e]);
                store_chunk<T, V>(W_out + (i0 + kk) * ld_out + jb + c, tw - c, vec, o);
            }
        }
    }
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

// Given Ā (d×r) and C̄ᵀ (d×r) of the effective factors (in place), A (d×r), Cᵀ (d×r) and the
// Grams S = AᵀA, K = CCᵀ (r×r):
//   energy (eq. 20–21, λ > 0):  Ā += 2λ A K,  C̄ᵀ += 2λ Cᵀ S   (S, K symmetric)
//   chain (eq. 19, no clip):    Ā += η_eff α C̄ᵀ,  B̄ = η_eff (1−α) C̄
// (src/grad/generator.rs `energy_backward`, `FactorChain::backward`). B̄ null: PSD. With
// `accumulate` ≠ 0 the chain's B̄ is added to the caller's buffer (`B̄ += …`, the functional calls'
// accumulate mode of src/cuda/ops); 0 overwrites it without reading it. Every entry
// (l, q) is independent: one thread each, over a grid of ⌈d·r / ELRA_BLOCK⌉ blocks, threads in
// B̄'s order (q major) so that its writes are coalesced. (The first version ran all d·r entries
// in one block: 79 µs at d = 4096, r = 8 on an H100, latency-bound.) ∂η needs C̄ after this
// kernel: factor_eta_f32.
extern "C" __global__ void __launch_bounds__(ELRA_BLOCK)
    factor_backward_f32(int d, int r, const float* A, const float* Ct, const float* S, const float* K, float lambda,
                        float alpha, const float* eta, float mult, float* Abar, float* CbarT, float* Bbar,
                        int accumulate) {
    const long long t = (long long)blockIdx.x * ELRA_BLOCK + threadIdx.x;
    if (t >= (long long)d * r) return;
    const long long q = t / d, l = t - q * d, idx = l * r + q;
    if (lambda > 0.0f) {
        const float two_l = lambda + lambda;
        float ea = 0.0f, ec = 0.0f;
        for (int p = 0; p < r; ++p) {
            ea = fmaf(A[l * r + p], K[p * r + q], ea);
            ec = fmaf(Ct[l * r + p], S[p * r + q], ec);
        }
        Abar[idx] = fmaf(two_l, ea, Abar[idx]);
        CbarT[idx] = fmaf(two_l, ec, CbarT[idx]);
    }
    const float eta_eff = eta[0] * mult;
    const float cb = CbarT[idx];
    if (alpha > 0.0f) Abar[idx] = fmaf(eta_eff * alpha, cb, Abar[idx]);
    if (Bbar) {
        const float g = (eta_eff * (1.0f - alpha)) * cb;
        Bbar[t] = accumulate ? Bbar[t] + g : g;
    }
}

// One block: ∂η = m ⟨C̄, C⟩ / η_eff (eq. 19) from the C̄ᵀ left by factor_backward_f32. Each thread
// keeps four partial sums over entries idx ≡ 4·tid + j (mod 4·ELRA_BLOCK), so four independent
// loads are in flight, then the partials are added in a fixed order (deterministic). With
// `accumulate` ≠ 0 the result is added to etabar[0], else it overwrites it (not read).
extern "C" __global__ void __launch_bounds__(ELRA_BLOCK)
    factor_eta_f32(int d, int r, const float* Ct, const float* CbarT, const float* eta, float mult, float* etabar,
                   int accumulate) {
    __shared__ float red[ELRA_BLOCK];
    const long long dr = (long long)d * r;
    float p0 = 0.0f, p1 = 0.0f, p2 = 0.0f, p3 = 0.0f;
    for (long long base = 4LL * threadIdx.x; base < dr; base += 4LL * ELRA_BLOCK) {
        p0 = fmaf(CbarT[base], Ct[base], p0);
        if (base + 1 < dr) p1 = fmaf(CbarT[base + 1], Ct[base + 1], p1);
        if (base + 2 < dr) p2 = fmaf(CbarT[base + 2], Ct[base + 2], p2);
        if (base + 3 < dr) p3 = fmaf(CbarT[base + 3], Ct[base + 3], p3);
    }
    const float dot = elra::block_sum((p0 + p1) + (p2 + p3), red);
    if (threadIdx.x == 0) {
        const float g = dot / (eta[0] * mult) * mult;
        etabar[0] = accumulate ? etabar[0] + g : g;
    }
}

// ---- the multi-adapter forward's small kernels ----------------------------------------------------
// Rows per adapter: block a counts the entries of index equal to a (grid: one block per adapter).
extern "C" __global__ void __launch_bounds__(ELRA_BLOCK)
    multi_count_i32(int n, const int* index, int* counts) {
    __shared__ int red[ELRA_BLOCK];
    const int a = blockIdx.x;
    int c = 0;
    for (int i = threadIdx.x; i < n; i += ELRA_BLOCK) c += index[i] == a;
    red[threadIdx.x] = c;
    __syncthreads();
    for (int s = ELRA_BLOCK / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) counts[a] = red[0];
}
// The segments and the row permutation, stable and without atomics: block a (one per adapter)
// writes seg[a] = Σ_{b<a} counts[b] (and seg[count] when it is the last) and the rows i with
// index[i] == a, in increasing order, to perm[seg[a] …], scanning index in windows of
// ELRA_BLOCK entries with a block-wide prefix sum.
extern "C" __global__ void __launch_bounds__(ELRA_BLOCK)
    multi_perm_i32(int n, const int* index, int count, const int* counts, int* seg, int* perm) {
    __shared__ int sc[ELRA_BLOCK];
    const int a = blockIdx.x;
    int c = 0;
    for (int b = threadIdx.x; b < a; b += ELRA_BLOCK) c += counts[b];
    sc[threadIdx.x] = c;
    __syncthreads();
    for (int s = ELRA_BLOCK / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) sc[threadIdx.x] += sc[threadIdx.x + s];
        __syncthreads();
    }
    const int start = sc[0];
    __syncthreads();
    if (threadIdx.x == 0) {
        seg[a] = start;
        if (a == count - 1) seg[count] = start + counts[a];
    }
    int placed = 0;
    for (int w0 = 0; w0 < n; w0 += ELRA_BLOCK) {
        const int i = w0 + (int)threadIdx.x;
        const int f = (i < n && index[i] == a) ? 1 : 0;
        sc[threadIdx.x] = f;
        __syncthreads();
        for (int s = 1; s < ELRA_BLOCK; s <<= 1) {  // inclusive scan (Hillis–Steele)
            const int v = (int)threadIdx.x >= s ? sc[threadIdx.x - s] : 0;
            __syncthreads();
            sc[threadIdx.x] += v;
            __syncthreads();
        }
        if (f) perm[start + placed + sc[threadIdx.x] - 1] = i;
        placed += sc[ELRA_BLOCK - 1];
        __syncthreads();
    }
}
// Per ELRA adapter of a launch batch (block x = adapter x of the batch): Cᵀ = η m (α A + (1−α) Bᵀ)
// (d×r, eq. 2, §4.2.1, eq. 19, as factor_c_f32, with the caller's leading dimensions) and then
// Z = C A (r×r, row-major) for the batched φ1 (Prop. 1). One block per adapter.
struct MultiPrepAdapter {
    const float* A;
    long long lda;
    const float* B;  // null: PSD (α = 1)
    long long ldb;
    const float* eta;
    float mult, alpha;
    int r;
    float* ct;
    float* z;
};
struct MultiPrepBatch {
    int count, d;
    MultiPrepAdapter a[ELRA_MULTI_PER_LAUNCH];
};
extern "C" __global__ void __launch_bounds__(ELRA_BLOCK) multi_prep_f32(MultiPrepBatch p) {
    if ((int)blockIdx.x >= p.count) return;
    const MultiPrepAdapter& m = p.a[blockIdx.x];
    const int d = p.d, r = m.r;
    const float eta_eff = m.eta[0] * m.mult;
    for (long long idx = threadIdx.x; idx < (long long)d * r; idx += ELRA_BLOCK) {
        const long long l = idx / r, q = idx - (idx / r) * r;
        float c = m.B ? m.B[q * m.ldb + l] * (eta_eff * (1.0f - m.alpha)) : 0.0f;
        if (m.alpha > 0.0f) c = fmaf(eta_eff * m.alpha, m.A[l * m.lda + q], c);
        m.ct[idx] = c;
    }
    __syncthreads();  // Cᵀ written by the block is visible to it
    for (int e = threadIdx.x; e < r * r; e += ELRA_BLOCK) {
        const int q = e / r, c = e - (e / r) * r;
        float s = 0.0f;
        for (long long l = 0; l < d; ++l) s = fmaf(m.ct[l * r + q], m.A[l * m.lda + c], s);
        m.z[e] = s;
    }
}
extern "C" __global__ void __launch_bounds__(ELRA_BLOCK)
    col_reduce_finish_f32(int n, int r, int n_chunks, const float* partial, float alpha, float beta, float* out,
                          long long os0, long long os1) {
    elra::skinny::col_reduce_finish(n, r, n_chunks, partial, alpha, beta, out, os0, os1);
}

// ---- entry points per activation type: {op}_{f32|f16|bf16} --------------------------------------

// Launch bounds, as measured on an H100 (2026-11-22, bf16, N = 8192, d = k = 4096, r = 8, one
// launch each): rows_fused with the plain bound (ptxas: 128 registers, 2 blocks/SM) 156 µs; asking
// for 3 blocks/SM (80 registers, 152 B of spills) 193 µs; asking for 1 (more registers) 252 µs.
// col_reduce_partial asking for 4 blocks/SM (64 registers, 16 B of spills) 50 µs; the plain bound
// (79 registers) 66 µs; 1 block/SM 83 µs.
#define ELRA_SKINNY_ENTRIES(T, SUFFIX)                                                                            \
    extern "C" __global__ void __launch_bounds__(ELRA_BLOCK) rows_fused_##SUFFIX(                                  \
        int n_rows, int rows_per_warp, int n_in, int n_out, int r, const T* in, long long ld_in, const T* base,    \
        long long ld_base, T* out, long long ld_out, const float* Cm, long long cs0, long long cs1, const float* Mm, \
        long long ms0, long long ms1, float m_scale, const float* Am, long long as0, long long as1, float* v_out,   \
        float* t_out) {                                                                                            \
        elra::skinny::rows_fused<T>(n_rows, rows_per_warp, n_in, n_out, r, in, ld_in, base, ld_base, out, ld_out,  \
                                    Cm, cs0, cs1, Mm, ms0, ms1, m_scale, Am, as0, as1, v_out, t_out);              \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ELRA_BLOCK, 4) col_reduce_partial_##SUFFIX(                          \
        int n_rows, int n, int r, int rows_per_chunk, const T* Y, long long ldy, const float* S, long long ss0,    \
        long long ss1, float* partial) {                                                                           \
        elra::skinny::col_reduce_partial<T>(n_rows, n, r, rows_per_chunk, Y, ldy, S, ss0, ss1, partial);           \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ELRA_BLOCK) merge_apply_##SUFFIX(                                 \
        int d, int k, int r, const T* W_in, long long ld_in, T* W_out, long long ld_out, float scale,              \
        const float* L, long long ls0, long long ls1, const float* R, long long rs0, long long rs1) {              \
        elra::skinny::merge_apply<T>(d, k, r, W_in, ld_in, W_out, ld_out, scale, L, ls0, ls1, R, rs0, rs1);        \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ELRA_BLOCK) rows_multi_##SUFFIX(                                  \
        elra::skinny::MultiRowsBatch p, const int* seg, const int* perm, int rows_per_warp, int d, int k,          \
        const T* x, long long ld_x, T* y, long long ld_y) {                                                        \
        elra::skinny::rows_multi<T>(p, seg, perm, rows_per_warp, d, k, x, ld_x, y, ld_y);                          \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ELRA_BLOCK) multi_finish_##SUFFIX(                                \
        int n, int d, T* y, long long ld_y, const T* bias, const int* index, int count) {                          \
        elra::skinny::multi_finish<T>(n, d, y, ld_y, bias, index, count);                                          \
    }

ELRA_SKINNY_ENTRIES(float, f32)
ELRA_SKINNY_ENTRIES(__half, f16)
ELRA_SKINNY_ENTRIES(__nv_bfloat16, bf16)
