// Eq. (21) Grams for a batch of adapters G = A·C (A d×r, C r×d): one thread block per adapter.
//
// Outputs per adapter b (all r×r, row-major):
//   Z  = C·A            the Woodbury core of Prop. 1 (φ1(Z) is taken next),
//   S  = AᵀA, K = CCᵀ   the Grams of eq. (21) (exactly symmetric: each pair computed once),
//   SK = S·K            whose largest eigenvalue is ‖G‖₂² (the spectral norm for the clip),
//   energy[b] = Σ_ij S_ij K_ji = tr(S K) = ‖G‖_F²  (eq. 21c).
// Status: ELRA_NONFINITE_INPUT if A or C holds NaN/±Inf (outputs set to NaN), ELRA_OVERFLOW if an
// output is not finite, ELRA_OK otherwise.
#include "common.cuh"

namespace elra {

template <typename T>
__device__ void adapter_grams(const T* __restrict__ A_all, const T* __restrict__ C_all, int d, int r,
                              T* Z_all, T* S_all, T* K_all, T* SK_all, T* energy, int* status) {
    __shared__ T red[ELRA_BLOCK];
    const size_t b = blockIdx.x;
    const size_t dr = (size_t)d * (size_t)r;
    const int rr = r * r;
    const T* A = A_all + b * dr;  // d×r: A[l*r + j]
    const T* C = C_all + b * dr;  // r×d: C[i*d + l]
    T* Z = Z_all + b * rr;
    T* S = S_all + b * rr;
    T* K = K_all + b * rr;
    T* SK = SK_all + b * rr;

    bool bad = false;
    for (size_t idx = threadIdx.x; idx < dr; idx += ELRA_BLOCK) bad |= !finite_(A[idx]) || !finite_(C[idx]);
    if (block_any(bad)) {
        const T nan = quiet_nan<T>();
        for (int idx = threadIdx.x; idx < rr; idx += ELRA_BLOCK) {
            Z[idx] = nan;
            S[idx] = nan;
            K[idx] = nan;
            SK[idx] = nan;
        }
        if (threadIdx.x == 0) {
            energy[b] = nan;
            status[b] = ELRA_NONFINITE_INPUT;
        }
        return;
    }

    // Z, S, K: one d-long dot product per entry (S and K: upper triangle, mirrored).
    for (int idx = threadIdx.x; idx < 3 * rr; idx += ELRA_BLOCK) {
        const int which = idx / rr, e = idx - which * rr, i = e / r, j = e - (e / r) * r;
        T acc = T(0);
        if (which == 0) {
            for (int l = 0; l < d; ++l) acc = fma_(C[(size_t)i * d + l], A[(size_t)l * r + j], acc);
            Z[e] = acc;
        } else if (which == 1) {
            if (i <= j) {
                for (int l = 0; l < d; ++l) acc = fma_(A[(size_t)l * r + i], A[(size_t)l * r + j], acc);
                S[i * r + j] = acc;
                S[j * r + i] = acc;
            }
        } else {
            if (i <= j) {
                for (int l = 0; l < d; ++l) acc = fma_(C[(size_t)i * d + l], C[(size_t)j * d + l], acc);
                K[i * r + j] = acc;
                K[j * r + i] = acc;
            }
        }
    }
    __syncthreads();

    mat_mul(S, K, SK, r);

    T part = T(0);
    for (int e = threadIdx.x; e < rr; e += ELRA_BLOCK) {
        const int i = e / r, j = e - (e / r) * r;
        part = fma_(S[i * r + j], K[j * r + i], part);
    }
    const T en = block_sum(part, red);

    bool over = !finite_(en);
    for (int e = threadIdx.x; e < rr; e += ELRA_BLOCK)
        over |= !finite_(Z[e]) || !finite_(S[e]) || !finite_(K[e]) || !finite_(SK[e]);
    over = block_any(over);
    if (threadIdx.x == 0) {
        energy[b] = en;
        status[b] = over ? ELRA_OVERFLOW : ELRA_OK;
    }
}

}  // namespace elra

extern "C" __global__ void __launch_bounds__(ELRA_BLOCK)
    adapter_grams_f32(const float* A, const float* C, int d, int r, float* Z, float* S, float* K,
                      float* SK, float* energy, int* status) {
    elra::adapter_grams<float>(A, C, d, r, Z, S, K, SK, energy, status);
}

extern "C" __global__ void __launch_bounds__(ELRA_BLOCK)
    adapter_grams_f64(const double* A, const double* C, int d, int r, double* Z, double* S, double* K,
                      double* SK, double* energy, int* status) {
    elra::adapter_grams<double>(A, C, d, r, Z, S, K, SK, energy, status);
}
