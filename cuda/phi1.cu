// Batched e^Z, φ1(Z) and the adjoint Fréchet derivative L_φ1(Zᵀ, G) of small square matrices by
// Padé scaling and squaring: a line-by-line port of the CPU core `src/linalg/expm.rs`
// (`Workspace::run`, Al-Mohy & Higham 2009 Alg. 3.1/5.1 with exact 1-norms and the ℓ-correction,
// φ1 from the same factorisation, Fréchet derivatives on block pairs). Read that module's docs for
// the mathematics; this file follows its operation order exactly.
//
// Parity with the CPU. build.rs compiles with -fmad=false, so `a*b + c` is a rounded product
// followed by a rounded sum, as in Rust (which never contracts). Every sum runs in the same index
// order as the CPU loops (dot products in k order, column sums in row order, LU updates and
// triangular solves in the same sequence). Results therefore equal the CPU bit for bit except
// where the device's pow/log2 differ from the host libm in the last bit and that moves a
// ceil() or comparison in the degree/scaling selection across a boundary (then m or s differs
// and the results differ by rounding only). The triangular path (exact diagonal and first
// superdiagonal after each squaring, `tri_stage`) evaluates exp and expm1 in double: the host
// emulation calls the host libm, the one the Rust core uses, and matches it bit for bit; on a GPU
// CUDA's exp/expm1 (≤ 1 ulp, not always correctly rounded) can differ from glibc's in the last
// bit of a double, which for f64 may move the last bit of a diagonal/superdiagonal entry (and,
// through the squarings, of the other entries) and for f32 almost never shows after the rounding
// to float. Balancing (f32) is exact-order arithmetic and matches everywhere.
//
// Layout: one thread block (ELRA_BLOCK threads) per matrix. The 12 work matrices of the CPU
// Workspace (a, a2, a4, a6, a8, t, w, v, u, d, r, p; `len` entries each: n² plain, 2n² for
// Fréchet pairs (X, Y) standing for [[X, Y], [0, X]]) live in dynamic shared memory when they fit
// (use_shared != 0) or in global scratch `work + blockIdx.x·12·len`. Vectors, pivots and reduction
// buffers are static shared memory. Sizes: n ≤ ELRA_MAX_N. The large helpers are __noinline__:
// inlining them at every call site made the fatbin 3× larger and ptxas 6× slower for no gain.
#include "common.cuh"

#define ELRA_MAX_N 64
#define ELRA_NBUF 12

ELRA_DYNAMIC_SHARED(elra_dyn_smem);

namespace elra {
namespace pade {

// A team is the set of threads that computes one matrix. Every helper below is written for a
// team: `Team::rank()` is the thread's index in it, loops stride by `Team::SIZE`, `Team::sync()`
// is its barrier and `Team::any`/`max_*` its reductions.
//   BlockTeam: the whole block (ELRA_BLOCK threads, __syncthreads), one matrix per block.
//   WarpTeam:  one warp (ELRA_WARP lanes, __syncwarp and shuffles), blockDim.x / ELRA_WARP
//              matrices per block, no block barrier at all. Measured slower than BlockTeam at
//              n = 16 on an H100 (the products' n² entries on 32 lanes cost more than the
//              barriers saved), so the host uses it only when asked (MatrixTeam::Warp).
// Which thread computes an entry changes nothing in how it is computed (every entry is one
// thread's sum in a fixed order; reductions are maxima), so both teams give the CPU's bits.
struct BlockTeam {
    static constexpr int SIZE = ELRA_BLOCK;
    static constexpr int MAX_PER_BLOCK = 1;
    __device__ static int rank() { return threadIdx.x; }
    __device__ static int index_in_block() { return 0; }
    __device__ static long long global_index() { return blockIdx.x; }
    __device__ static void sync() { __syncthreads(); }
    __device__ static bool any(bool f) { return block_any(f); }
    template <typename T> __device__ static T max_nan(T v, T* red) { return block_max(v, red); }
    template <typename T> __device__ static T max_ignore_nan(T v, T* red) { return block_max_ignore_nan(v, red); }
};

struct WarpTeam {
    static constexpr int SIZE = ELRA_WARP;
    static constexpr int MAX_PER_BLOCK = ELRA_NWARPS;
    __device__ static int rank() { return threadIdx.x % ELRA_WARP; }
    __device__ static int index_in_block() { return threadIdx.x / ELRA_WARP; }
    __device__ static long long global_index() {
        return (long long)blockIdx.x * (blockDim.x / ELRA_WARP) + threadIdx.x / ELRA_WARP;
    }
    __device__ static void sync() { __syncwarp(); }
    // Reductions end with __syncwarp like the block ones end with __syncthreads: callers rely on
    // them to publish shared-memory writes made just before (e.g. the ℓ vector of
    // abs_vecmat_step); shuffles alone order no memory (compute-sanitizer racecheck flagged it).
    __device__ static bool any(bool f) {
        const bool r = __any_sync(0xffffffffu, f) != 0;
        __syncwarp();
        return r;
    }
    template <typename T, typename Op> __device__ static T butterfly(T v, Op op) {
        for (int o = ELRA_WARP / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
        __syncwarp();
        return v;
    }
    template <typename T> __device__ static T max_nan(T v, T*) {
        return butterfly(v, [](T a, T b) { return nan_max(a, b); });
    }
    template <typename T> __device__ static T max_ignore_nan(T v, T*) {
        return butterfly(v > T(0) ? v : T(0), [](T a, T b) { return b > a ? b : a; });
    }
};

}  // namespace pade
}  // namespace elra

namespace elra {
namespace pade {

// Padé coefficients b_0..b_m (Higham 2005 eq. 2.2), as in expm.rs.
__constant__ double B3[4] = {120.0, 60.0, 12.0, 1.0};
__constant__ double B5[6] = {30240.0, 15120.0, 3360.0, 420.0, 30.0, 1.0};
__constant__ double B7[8] = {17297280.0, 8648640.0, 1995840.0, 277200.0, 25200.0, 1512.0, 56.0, 1.0};
__constant__ double B9[10] = {17643225600.0, 8821612800.0, 2075673600.0, 302702400.0, 30270240.0,
                              2162160.0,     110880.0,     3960.0,       90.0,        1.0};
__constant__ double B13[14] = {64764752532480000.0, 32382376266240000.0, 7771770303897600.0,
                               1187353796428800.0,  129060195264000.0,   10559470521600.0,
                               670442572800.0,      33522128640.0,       1323241920.0,
                               40840800.0,          960960.0,            16380.0,
                               182.0,               1.0};

// expm.rs `log2_c`, ported literally: log2 c_{2m+1} = −log2((2m)!(2m+1)!/(m!)²), with the f64
// quotient (2m+1)!·(Π_{i=m+1}^{2m} i)/m! formed in the same order as on the CPU.
__device__ __forceinline__ double log2_c(int m) {
    double q = 1.0;
    for (int i = 2; i <= 2 * m + 1; ++i) q *= (double)i;
    for (int i = m + 1; i <= 2 * m; ++i) q *= (double)i;
    for (int i = 2; i <= m; ++i) q /= (double)i;
    return -log2(q);
}

// expm.rs `log2_upper`: ⌊log2 x⌋ + 1 from the exponent bits (normal x), log2 x (subnormal).
__device__ __forceinline__ double log2_upper(double x) {
    const long long e = (__double_as_longlong(x) >> 52) & 0x7ff;
    return e == 0 ? log2(x) : (double)(e - 1023 + 1);
}

// Precision-dependent constants (Real::PADE, UNIT_ROUNDOFF, emax of expm.rs).
template <typename T> struct Prec;
template <> struct Prec<double> {
    static constexpr int TOP = 13;
    static constexpr bool BALANCE = false;  // Real::BALANCE
    static constexpr double LOG2_U = -53.0;  // log2(2^-53)
    static constexpr double EMAX = 1023.0;   // floor(log2(DBL_MAX))
    static constexpr double KMAX = 10.0;
    __device__ static double theta(int m) {
        switch (m) {
            case 3: return 1.495585217958292e-2;
            case 5: return 2.539398330063230e-1;
            case 7: return 9.504178996162932e-1;
            case 9: return 2.097847961257068;
            default: return 4.25;  // θ13 of AMH 2009 Alg. 5.1
        }
    }
};
template <> struct Prec<float> {
    static constexpr int TOP = 7;
    static constexpr bool BALANCE = true;
    static constexpr double LOG2_U = -24.0;
    static constexpr double EMAX = 127.0;
    static constexpr double KMAX = 8.0;
    __device__ static double theta(int m) {
        switch (m) {
            case 3: return 4.258730016922831e-1;
            case 5: return 1.880152677804762;
            default: return 3.925724783138660;  // m = 7
        }
    }
};

template <typename T, typename Team> struct Ws {
    int n;       // matrix size
    int nn;      // n²
    bool pair;   // Fréchet pairs: len = 2n²
    int len;     // entries per buffer in this run
    T *a, *a2, *a4, *a6, *a8, *t, *w, *v, *u, *d, *r, *p;
    T* ell_v;    // 2n (shared): row vector 1ᵀ|A|^steps · 2^-ell_exp of the ℓ iteration
    T* ell_w;    // 2n (shared): its scratch
    int ell_steps;
    long long ell_exp;
    bool ell_zero;
    bool ell_started;
    bool a8_formed;
    int* piv;    // n  (shared)
    T* tri;      // 2n (shared; plain runs): diagonal and first superdiagonal of a triangular input
    int* bal;    // n  (shared; plain runs): balancing exponents, the run sees diag(2^-bal) Z diag(2^bal)
    T* red;      // Team::SIZE (shared)
    double* redd;  // Team::SIZE (shared)
    int* sh_int;   // 1 (shared)
};

// ---- elementwise and block-cooperative helpers (each ends with a barrier) -------------------

template <typename T, typename Team> __device__ void fill(T* x, int len, T v) {
    for (int i = Team::rank(); i < len; i += Team::SIZE) x[i] = v;
    Team::sync();
}

template <typename T, typename Team> __device__ void copy(const T* x, T* y, int len) {
    for (int i = Team::rank(); i < len; i += Team::SIZE) y[i] = x[i];
    Team::sync();
}

// expm.rs `scale_pow2`: multiply by 2^e in exact steps of at most 2^±60, |e| clamped to 4400
// (beyond it every finite value is already 0 or ±inf), so the loop always ends.
template <typename T, typename Team> __device__ __noinline__ void scale_pow2(T* x, int len, long long e) {
    e = e < -4400 ? -4400 : (e > 4400 ? 4400 : e);
    while (e != 0) {
        const long long step = e < -60 ? -60 : (e > 60 ? 60 : e);
        const T f = ldexp_(T(1), (int)step);
        for (int i = Team::rank(); i < len; i += Team::SIZE) x[i] *= f;
        Team::sync();
        e -= step;
    }
}

// expm.rs `gemm` (plain, acc = false): c = a·b, n×n; per entry Σ_k a_ik b_kj in k order from 0.
template <typename T, typename Team> __device__ __noinline__ void gemm(int n, const T* a, const T* b, T* c) {
    const int nn = n * n;
    for (int idx = Team::rank(); idx < nn; idx += Team::SIZE) {
        const int i = idx / n, j = idx - i * n;
        T s = T(0);
        for (int k = 0; k < n; ++k) s += a[i * n + k] * b[k * n + j];
        c[idx] = s;
    }
    Team::sync();
}

// expm.rs `mul`: pair-aware product c = a·b; pairs: (X₁X₂, X₁Y₂ + Y₁X₂), each of the two Y sums
// formed from zero in k order and then added (the CPU's second gemm call with acc = true).
template <typename T, typename Team> __device__ __noinline__ void mul(const Ws<T, Team>& ws, const T* a, const T* b, T* c) {
    const int n = ws.n, nn = ws.nn;
    for (int idx = Team::rank(); idx < ws.len; idx += Team::SIZE) {
        if (idx < nn) {
            const int i = idx / n, j = idx - i * n;
            T s = T(0);
            for (int k = 0; k < n; ++k) s += a[i * n + k] * b[k * n + j];
            c[idx] = s;
        } else {
            const int e = idx - nn, i = e / n, j = e - i * n;
            T s1 = T(0), s2 = T(0);
            for (int k = 0; k < n; ++k) s1 += a[i * n + k] * b[nn + k * n + j];
            for (int k = 0; k < n; ++k) s2 += a[nn + i * n + k] * b[k * n + j];
            c[idx] = s1 + s2;
        }
    }
    Team::sync();
}

// expm.rs `norm1`: exact 1-norm of the (block) matrix, column sums over all stored rows (X rows
// then Y rows) in order, NaN propagates. Returned to every thread.
template <typename T, typename Team> __device__ __noinline__ double norm1(const Ws<T, Team>& ws, const T* x, int len) {
    const int n = ws.n, rows = len / n;
    double m = 0.0;
    for (int j = Team::rank(); j < n; j += Team::SIZE) {
        T c = T(0);
        for (int i = 0; i < rows; ++i) c += abs_(x[i * n + j]);
        const double cd = (double)c;
        m = (cd != cd || m != m) ? (0.0 / 0.0) : fmax(m, cd);
    }
    return Team::max_nan(m, ws.redd);
}

template <typename T, typename Team> __device__ bool all_finite_(const Ws<T, Team>& ws, const T* x, int len) {
    bool bad = false;
    for (int i = Team::rank(); i < len; i += Team::SIZE) bad |= !finite_(x[i]);
    return !Team::any(bad);
}

// expm.rs `abs_vecmat_step`: w = v·|X| (pairs: [a, b]·|[[X, Y], [0, X]]| = [a|X|, a|Y| + b|X|]),
// each w_j summed over i in order from 0. Returns max_j w_j (NaN-ignoring, from 0) to every thread.
template <typename T, typename Team>
__device__ __noinline__ T abs_vecmat_step(const Ws<T, Team>& ws, const T* x, const T* v, T* w) {
    const int n = ws.n, nn = ws.nn;
    const int vlen = ws.pair ? 2 * n : n;
    T cand = T(0);
    for (int j = Team::rank(); j < vlen; j += Team::SIZE) {
        T s = T(0);
        if (j < n) {
            for (int i = 0; i < n; ++i) s += v[i] * abs_(x[i * n + j]);
        } else {
            const int jj = j - n;
            for (int i = 0; i < n; ++i) s += v[i] * abs_(x[nn + i * n + jj]) + v[n + i] * abs_(x[i * n + jj]);
        }
        w[j] = s;
        cand = s > cand ? s : cand;
    }
    return Team::max_ignore_nan(cand, ws.red);  // its barriers also publish w
}

// max_j v_j of the ℓ vector with expm.rs's fold (`if c > m { c } else { m }` from 0).
template <typename T, typename Team> __device__ T vmax(const Ws<T, Team>& ws, const T* v) {
    const int vlen = ws.pair ? 2 * ws.n : ws.n;
    T cand = T(0);
    for (int j = Team::rank(); j < vlen; j += Team::SIZE) cand = v[j] > cand ? v[j] : cand;
    return Team::max_ignore_nan(cand, ws.red);
}

// expm.rs `lu_factor`: in-place LU with partial pivoting of the n×n `d` (row-major), full-row
// swaps, multipliers stored below the diagonal. false if a pivot is zero or not finite.
//
// Per step k, two barriers: warp 0 stores the multipliers of column k−1 (deferred, see below),
// finds the pivot by a shuffle arg-max and swaps the rows; then every thread updates the trailing
// block with l = d_ik · (1/d_kk), the very product the CPU stores as the multiplier before using
// it, so the arithmetic is the CPU's operation for operation. The multipliers of column k are
// written at the start of step k+1: the update of step k still reads the unscaled column, and
// the row swap of step k+1 must move them. The pivot is the CPU's scan `v > best` from i = k: the
// first row holding the largest non-NaN |d_ik|, i ≥ k (a NaN |d_kk| fails the step as on the CPU).
template <typename T, typename Team> __device__ __noinline__ bool lu_factor(const Ws<T, Team>& ws, T* d) {
    const int n = ws.n;
    const int lane = Team::rank() % ELRA_WARP;
    const bool warp0 = Team::rank() < ELRA_WARP;
    for (int k = 0; k < n; ++k) {
        if (warp0) {
            if (k > 0) {
                const int c = k - 1;
                const T inv = T(1) / d[c * n + c];
                for (int i = k + lane; i < n; i += ELRA_WARP) d[i * n + c] = d[i * n + c] * inv;
                __syncwarp();
            }
            const T dkk = abs_(d[k * n + k]);
            T best = T(-1);
            int p = 0x7fffffff;
            for (int i = k + lane; i < n; i += ELRA_WARP) {
                const T v = abs_(d[i * n + k]);
                if (v > best) {  // NaN never replaces; rows ascend per lane, so ties keep the first
                    best = v;
                    p = i;
                }
            }
            for (int o = ELRA_WARP / 2; o > 0; o >>= 1) {
                const T ob = __shfl_xor_sync(0xffffffffu, best, o);
                const int op = __shfl_xor_sync(0xffffffffu, p, o);
                if (ob > best || (ob == best && op < p)) {
                    best = ob;
                    p = op;
                }
            }
            // best = −1 only if every |d_ik| is NaN; then (as with a NaN |d_kk|) the CPU fails.
            const bool fail = dkk != dkk || best < T(0) || best == T(0) || !finite_(best);
            if (lane == 0) {
                ws.piv[k] = fail ? k : p;
                ws.sh_int[0] = fail ? -1 : p;
            }
            if (!fail && p != k) {
                for (int j = lane; j < n; j += ELRA_WARP) {
                    const T tmp = d[k * n + j];
                    d[k * n + j] = d[p * n + j];
                    d[p * n + j] = tmp;
                }
            }
        }
        Team::sync();
        const int p = ws.sh_int[0];
        if (p < 0) {
            Team::sync();  // sh_int is rewritten by a later call
            return false;
        }
        const T inv = T(1) / d[k * n + k];
        const int m = n - k - 1;  // trailing size
        for (int idx = Team::rank(); idx < m * m; idx += Team::SIZE) {
            const int i = k + 1 + idx / m, j = k + 1 + idx % m;
            const T l = d[i * n + k] * inv;
            if (l != T(0)) d[i * n + j] -= l * d[k * n + j];
        }
        Team::sync();
    }
    return true;
}

// expm.rs `lu_solve`: D X = B in place on the n×n `b` (n right-hand sides). One thread per
// column runs the CPU's row operations for that column in the same order.
template <typename T, typename Team> __device__ __noinline__ void lu_solve(const Ws<T, Team>& ws, const T* lu, T* b) {
    const int n = ws.n;
    for (int j = Team::rank(); j < n; j += Team::SIZE) {
        for (int k = 0; k < n; ++k) {
            const int p = ws.piv[k];
            if (p != k) {
                const T tmp = b[k * n + j];
                b[k * n + j] = b[p * n + j];
                b[p * n + j] = tmp;
            }
        }
        for (int i = 1; i < n; ++i) {
            T t = b[i * n + j];
            for (int k = 0; k < i; ++k) t -= lu[i * n + k] * b[k * n + j];
            b[i * n + j] = t;
        }
        for (int i = n - 1; i >= 0; --i) {
            const T inv = T(1) / lu[i * n + i];
            T t = b[i * n + j];
            for (int k = i + 1; k < n; ++k) t -= lu[i * n + k] * b[k * n + j];
            b[i * n + j] = t * inv;
        }
    }
    Team::sync();
}

// expm.rs `Workspace::solve_pair`: X_X = D_X⁻¹B_X; pairs: X_Y = D_X⁻¹(B_Y − D_Y X_X).
template <typename T, typename Team> __device__ void solve_pair(const Ws<T, Team>& ws, T* x) {
    const int nn = ws.nn;
    lu_solve(ws, ws.d, x);
    if (ws.pair) {
        gemm<T, Team>(ws.n, ws.d + nn, x, ws.t);
        for (int i = Team::rank(); i < nn; i += Team::SIZE) x[nn + i] -= ws.t[i];
        Team::sync();
        lu_solve(ws, ws.d, x + nn);
    }
}

// expm.rs `Workspace::ell`: decides ℓ(2⁻ˢA, m) (AMH 2009 eq. 5.1) for the A in `a` with 1-norm
// norm_a. ℓ = 0 iff log2‖|A|^p‖₁ ≤ thr (p = 2m+1); ‖|A|^p‖₁ by the row-vector iteration cached
// across the calls of one selection, with exact power-of-two rescaling and the early exit
// ‖|A|^p‖ ≤ ‖|A|^j‖·‖A‖^{p−j}. The state lives in `ws` (uniform across the block).
template <typename T, typename Team> __device__ __noinline__ long long ell(Ws<T, Team>& ws, double norm_a, int m, long long s) {
    if (norm_a == 0.0) return 0;
    const int p = 2 * m + 1;
    const double log2_norm_a = log2(norm_a);
    const double thr = Prec<T>::LOG2_U - log2_c(m) + log2_norm_a + (double)(2 * m) * (double)s;
    const int vlen = ws.pair ? 2 * ws.n : ws.n;
    if (ws.ell_steps > p) {
        ws.ell_steps = 0;
        ws.ell_started = false;
    }
    if (ws.ell_steps == 0 && !ws.ell_started) {
        fill<T, Team>(ws.ell_v, vlen, T(1));
        ws.ell_exp = 0;
        ws.ell_zero = false;
        ws.ell_started = true;
    }
    double mu = (double)vmax(ws, ws.ell_v);
    for (;;) {
        if (ws.ell_zero) return 0;
        const int j = ws.ell_steps < p ? ws.ell_steps : p;
        const double upper = log2_upper(mu) + (double)ws.ell_exp + (double)(p - j) * log2_norm_a;
        if (upper <= thr) return 0;
        if (ws.ell_steps >= p) break;
        const T mx = abs_vecmat_step(ws, ws.a, ws.ell_v, ws.ell_w);
        T* tmp = ws.ell_v;
        ws.ell_v = ws.ell_w;
        ws.ell_w = tmp;
        ws.ell_steps += 1;
        mu = (double)mx;
        if (mu == 0.0) {
            ws.ell_zero = true;
        } else if (!(mu >= 0x1p-60 && mu <= 0x1p60)) {
            long long k = (long long)floor(log2(mu));
            // Guard (not in the CPU code): mu = +inf would give k = i64::MAX and a ~10¹⁷-step
            // scale_pow2 loop. Clamped, the iteration ends with lp = inf → ℓ = 10⁶ → overflow
            // status. Finite mu always has |k| ≤ 1100, where this changes nothing.
            k = k > 4096 ? 4096 : (k < -4096 ? -4096 : k);
            scale_pow2<T, Team>(ws.ell_v, vlen, -k);
            ws.ell_exp += k;
            mu = (double)vmax(ws, ws.ell_v);
        }
    }
    const double lp = log2(mu) + (double)ws.ell_exp;
    const double v = ceil((lp - thr) / (double)(2 * m));
    if (v != v || v <= 0.0) return 0;
    return (long long)fmin(v, 1.0e6);
}

// expm.rs `Workspace::form_a8`: A8 = A4·A4; d₈ = ‖A8‖^{1/8}; false on overflow.
template <typename T, typename Team> __device__ bool form_a8(Ws<T, Team>& ws, double& d8) {
    mul(ws, ws.a4, ws.a4, ws.a8);
    ws.a8_formed = true;
    const double n8 = norm1(ws, ws.a8, ws.len);
    if (!isfinite(n8)) return false;
    d8 = pow(n8, 0.125);
    return true;
}

// expm.rs `select`'s closure `eta3_below`: whether η₃ = max(d₆, d₈) < θ (strict) or ≤ θ, deciding
// with the bound d8_up when it settles the comparison, else forming A8 once. Returns false in
// `ok` when forming A8 overflowed.
template <typename T, typename Team>
__device__ bool eta3_below(Ws<T, Team>& ws, double th, bool strict, double d6, double d8_up, bool& have_d8, double& d8,
                           bool& ok) {
    ok = true;
    const bool b6 = strict ? d6 < th : d6 <= th;
    if (!b6) return false;
    const bool bup = strict ? d8_up < th : d8_up <= th;
    if (bup && !have_d8) return true;
    if (!have_d8) {
        if (!form_a8(ws, d8)) {
            ok = false;
            return false;
        }
        have_d8 = true;
    }
    return strict ? d8 < th : d8 <= th;
}

// expm.rs `Workspace::powers` + `select` (AMH 2009 Alg. 5.1 with exact norms). Returns false when
// a power overflowed; otherwise sets m and s for the current `a`.
template <typename T, typename Team> __device__ __noinline__ bool select(Ws<T, Team>& ws, int& m_out, long long& s_out) {
    const int len = ws.len;
    const int top = Prec<T>::TOP;
    ws.ell_steps = 0;
    ws.ell_started = false;
    ws.a8_formed = false;
    const double norm_a = norm1(ws, ws.a, len);
    if (!isfinite(norm_a)) return false;
    mul(ws, ws.a, ws.a, ws.a2);
    mul(ws, ws.a2, ws.a2, ws.a4);
    mul(ws, ws.a4, ws.a2, ws.a6);
    const double n2 = norm1(ws, ws.a2, len);
    const double n4 = norm1(ws, ws.a4, len);
    const double n6 = norm1(ws, ws.a6, len);
    if (!(isfinite(n2) && isfinite(n4) && isfinite(n6))) return false;
    const double d4 = pow(n4, 0.25);
    const double d6 = pow(n6, 1.0 / 6.0);
    const double eta1 = fmax(d4, d6);
    if (eta1 < Prec<T>::theta(3) && ell(ws, norm_a, 3, 0) == 0) {
        m_out = 3;
        s_out = 0;
        return true;
    }
    if (eta1 < Prec<T>::theta(5) && ell(ws, norm_a, 5, 0) == 0) {
        m_out = 5;
        s_out = 0;
        return true;
    }
    const double d8_up = pow(fmin(n4 * n4, n2 * n6), 0.125);
    bool have_d8 = false, ok = true;
    double d8 = 0.0;
    if (eta3_below(ws, Prec<T>::theta(7), true, d6, d8_up, have_d8, d8, ok) && ell(ws, norm_a, 7, 0) == 0) {
        m_out = 7;
        s_out = 0;
        return true;
    }
    if (!ok) return false;
    if (top == 13) {
        const bool below9 = eta3_below(ws, Prec<T>::theta(9), true, d6, d8_up, have_d8, d8, ok);
        if (!ok) return false;
        if (below9 && ell(ws, norm_a, 9, 0) == 0) {
            m_out = 9;
            s_out = 0;
            return true;
        }
    }
    double eta;
    const bool below_top = eta3_below(ws, Prec<T>::theta(top), false, d6, d8_up, have_d8, d8, ok);
    if (!ok) return false;
    if (below_top) {
        eta = 0.0;  // η ≤ η₃ ≤ θ: the first term of s is 0
    } else {
        if (!have_d8) {
            if (!form_a8(ws, d8)) return false;
            have_d8 = true;
        }
        const double eta3 = fmax(d6, d8);
        if (top == 13 && d8 < d6) {
            mul(ws, ws.a4, ws.a6, ws.t);
            const double n10 = norm1(ws, ws.t, len);
            if (!isfinite(n10)) return false;
            const double d10 = pow(n10, 0.1);
            eta = fmin(eta3, fmax(d8, d10));
        } else {
            eta = eta3;
        }
    }
    const int m = top;
    long long s = 0;
    if (eta != 0.0) {
        const double v = ceil(log2(eta / Prec<T>::theta(m)));
        s = v > 0.0 ? (long long)fmin(v, 1.0e6) : 0;
    }
    s += ell(ws, norm_a, m, s);
    m_out = m;
    s_out = s;
    return true;
}

// ---- exact structure: balancing and triangular inputs (expm.rs `balance`, `detect_triangular`,
// `tri_stage`, `transpose_in_place`, `unbalance`) --------------------------------------------

#define ELRA_TRI_NONE 0
#define ELRA_TRI_UPPER 1
#define ELRA_TRI_LOWER 2
#define ELRA_BAL_MAX_SWEEPS 32
#define ELRA_BAL_MAX_EXP 60

// expm.rs `ldexp_steps`: x·2^e by factors of at most 2^±60, |e| clamped to 4400.
__device__ __forceinline__ double ldexp_steps(double x, long long e) {
    e = e < -4400 ? -4400 : (e > 4400 ? 4400 : e);
    while (e != 0) {
        const long long step = e < -60 ? -60 : (e > 60 ? 60 : e);
        x *= ldexp(1.0, (int)step);
        e -= step;
    }
    return x;
}

// expm.rs `phi1_scalar`: φ1(x) = expm1(x)/x, φ1(0) = 1.
__device__ __forceinline__ double phi1_scalar(double x) { return x == 0.0 ? 1.0 : expm1(x) / x; }

// expm.rs `exp_divdiff`: exp[x, y] = e^M·φ1(−δ), M = max(x, y), δ = |x − y|.
__device__ __forceinline__ double exp_divdiff(double x, double y) {
    const double m = x >= y ? x : y;
    const double d = x >= y ? x - y : y - x;
    return exp(m) * phi1_scalar(-d);
}

// expm.rs `phi1_divdiff`: φ1[x, y] = exp[x, y, 0] (derivation there): the series
// Σ h_k(x, y)/(k+2)! (30 terms, summed smallest first) when |x| < 1 or 0 ≤ y ≤ x < 2 (|x| ≥ |y|
// after a swap), else (exp[x, y] − φ1(x))/y for x < 0 < 1 ≤ y and (exp[x, y] − φ1(y))/x.
__device__ __noinline__ double phi1_divdiff(double x, double y) {
    if (fabs(x) < fabs(y)) {
        const double t = x;
        x = y;
        y = t;
    }
    if (fabs(x) < 1.0 || (x >= 0.0 && y >= 0.0 && x < 2.0)) {
        double terms[30];
        double h = 1.0, yk = 1.0, fact = 1.0;
        for (int k = 0; k < 30; ++k) {
            if (k > 0) {
                yk *= y;
                h = x * h + yk;
            }
            fact *= (double)(k + 2);
            terms[k] = h / fact;
        }
        double acc = 0.0;
        for (int k = 29; k >= 0; --k) acc = acc + terms[k];
        return acc;
    }
    if (x < 0.0 && y >= 1.0) return (exp_divdiff(x, y) - phi1_scalar(x)) / y;
    return (exp_divdiff(x, y) - phi1_scalar(y)) / x;
}

// expm.rs `transpose_in_place` on the n×n main block (each pair swapped by one thread).
template <typename T, typename Team> __device__ void transpose_nn(const Ws<T, Team>& ws, T* x) {
    const int n = ws.n;
    for (int idx = Team::rank(); idx < ws.nn; idx += Team::SIZE) {
        const int i = idx / n, j = idx - i * n;
        if (i < j) {
            const T tmp = x[i * n + j];
            x[i * n + j] = x[j * n + i];
            x[j * n + i] = tmp;
        }
    }
    Team::sync();
}

// expm.rs `Workspace::balance` (EISPACK balanc, radix 2, off-diagonal 1-norms summed in double in
// index order; kept only if it lowers ‖·‖₁). The sweeps are sequential by nature; the team's
// first thread runs them (O(n²) per sweep), the team then compares the norms.
template <typename T, typename Team> __device__ __noinline__ bool balance(Ws<T, Team>& ws) {
    const int n = ws.n, nn = ws.nn;
    for (int i = Team::rank(); i < n; i += Team::SIZE) ws.bal[i] = 0;
    Team::sync();
    if (n < 2) return false;
    copy<T, Team>(ws.a, ws.r, nn);  // the unbalanced input, to restore
    if (Team::rank() == 0) {
        T* a = ws.a;
        int changed = 0;
        for (int sweep = 0; sweep < ELRA_BAL_MAX_SWEEPS; ++sweep) {
            bool noconv = false;
            for (int i = 0; i < n; ++i) {
                double c = 0.0, r = 0.0;
                for (int j = 0; j < n; ++j) {
                    if (j != i) {
                        c += (double)abs_(a[j * n + i]);
                        r += (double)abs_(a[i * n + j]);
                    }
                }
                if (c == 0.0 || r == 0.0) continue;
                const double s = c + r;
                const int e = ws.bal[i];
                int k = 0;
                while (c < r * 0.5 && e + k < ELRA_BAL_MAX_EXP) {
                    k += 1;
                    c *= 4.0;
                }
                while (c >= r * 2.0 && e + k > -ELRA_BAL_MAX_EXP) {
                    k -= 1;
                    c *= 0.25;
                }
                if (k == 0 || (c + r) * ldexp(1.0, -k) >= 0.95 * s) continue;
                ws.bal[i] = e + k;
                noconv = true;
                changed = 1;
                const T g = (T)ldexp(1.0, -k), f = (T)ldexp(1.0, k);
                for (int j = 0; j < n; ++j) a[i * n + j] *= g;
                for (int j = 0; j < n; ++j) a[j * n + i] *= f;
            }
            if (!noconv) break;
        }
        ws.sh_int[0] = changed;
    }
    Team::sync();
    const bool changed = ws.sh_int[0] != 0;
    Team::sync();  // sh_int is rewritten later (lu_factor)
    if (!changed) return false;
    const double before = norm1(ws, ws.r, nn);
    const double after = norm1(ws, ws.a, nn);
    if (after < before) return true;
    copy<T, Team>(ws.r, ws.a, nn);
    for (int i = Team::rank(); i < n; i += Team::SIZE) ws.bal[i] = 0;
    Team::sync();
    return false;
}

// expm.rs `Workspace::detect_triangular`: upper (every strictly lower entry zero), else lower
// (every strictly upper entry zero; `a` transposed), else none; n = 1 stays on the general path.
// Stores the diagonal and first superdiagonal in `tri`.
template <typename T, typename Team> __device__ __noinline__ int detect_triangular(Ws<T, Team>& ws) {
    const int n = ws.n;
    if (n < 2) return ELRA_TRI_NONE;
    bool lower_nz = false, upper_nz = false;
    for (int idx = Team::rank(); idx < ws.nn; idx += Team::SIZE) {
        const int i = idx / n, j = idx - i * n;
        const bool nz = ws.a[idx] != T(0);
        lower_nz |= i > j && nz;
        upper_nz |= i < j && nz;
    }
    const bool any_lower = Team::any(lower_nz);
    const bool any_upper = Team::any(upper_nz);
    int kind;
    if (!any_lower) {
        kind = ELRA_TRI_UPPER;
    } else if (!any_upper) {
        transpose_nn(ws, ws.a);
        kind = ELRA_TRI_LOWER;
    } else {
        return ELRA_TRI_NONE;
    }
    for (int i = Team::rank(); i < n; i += Team::SIZE) {
        ws.tri[i] = ws.a[i * n + i];
        if (i + 1 < n) ws.tri[n + i] = ws.a[i * n + i + 1];
    }
    Team::sync();
    return kind;
}

// expm.rs `Workspace::tri_stage`: exact diagonal and first superdiagonal of e^{2^-j T} (in r,
// when fix_r) and φ1(2^-j T) (in p, when fix_p), in double, rounded once to T; a non-finite
// superdiagonal value, or t = 0, leaves the computed entry.
template <typename T, typename Team> __device__ __noinline__ void tri_stage(const Ws<T, Team>& ws, long long j, bool fix_r,
                                                                  bool fix_p) {
    const int n = ws.n;
    for (int i = Team::rank(); i < n; i += Team::SIZE) {
        const double x = ldexp_steps((double)ws.tri[i], -j);
        if (fix_r) ws.r[i * n + i] = (T)exp(x);
        if (fix_p) ws.p[i * n + i] = (T)phi1_scalar(x);
        if (i + 1 < n && ws.tri[n + i] != T(0)) {
            const double y = ldexp_steps((double)ws.tri[i + 1], -j);
            const double t = ldexp_steps((double)ws.tri[n + i], -j);
            if (fix_r) {
                const T v = (T)(t * exp_divdiff(x, y));
                if (finite_(v)) ws.r[i * n + i + 1] = v;
            }
            if (fix_p) {
                const T v = (T)(t * phi1_divdiff(x, y));
                if (finite_(v)) ws.p[i * n + i + 1] = v;
            }
        }
    }
    Team::sync();
}

// expm.rs `unbalance`: x_ij·2^{bal_i − bal_j}, the product exact in double, rounded once to T.
template <typename T, typename Team> __device__ void unbalance(const Ws<T, Team>& ws, T* x) {
    const int n = ws.n;
    for (int idx = Team::rank(); idx < ws.nn; idx += Team::SIZE) {
        const int i = idx / n, j = idx - i * n;
        const int k = ws.bal[i] - ws.bal[j];
        if (k != 0) x[idx] = (T)((double)x[idx] * ldexp(1.0, k));
    }
    Team::sync();
}

// W (odd part / A) and V (even part) for degree m from the (scaled) powers, expm.rs order.
template <typename T, typename Team> __device__ void form_wv(const Ws<T, Team>& ws, int m) {
    const int len = ws.len;
    const double* bs = m == 3 ? B3 : m == 5 ? B5 : m == 7 ? B7 : m == 9 ? B9 : B13;
#define PADE_B(k) ((T)bs[k])
    if (m == 13) {
        for (int i = Team::rank(); i < len; i += Team::SIZE)
            ws.t[i] = PADE_B(13) * ws.a6[i] + PADE_B(11) * ws.a4[i] + PADE_B(9) * ws.a2[i];
        Team::sync();
        mul(ws, ws.a6, ws.t, ws.w);
        for (int i = Team::rank(); i < len; i += Team::SIZE)
            ws.t[i] = PADE_B(12) * ws.a6[i] + PADE_B(10) * ws.a4[i] + PADE_B(8) * ws.a2[i];
        Team::sync();
        mul(ws, ws.a6, ws.t, ws.v);
        for (int i = Team::rank(); i < len; i += Team::SIZE) {
            ws.w[i] += PADE_B(7) * ws.a6[i] + PADE_B(5) * ws.a4[i] + PADE_B(3) * ws.a2[i];
            ws.v[i] += PADE_B(6) * ws.a6[i] + PADE_B(4) * ws.a4[i] + PADE_B(2) * ws.a2[i];
        }
    } else {
        for (int i = Team::rank(); i < len; i += Team::SIZE) {
            const T x2 = ws.a2[i];
            if (m == 3) {
                ws.w[i] = PADE_B(3) * x2;
                ws.v[i] = PADE_B(2) * x2;
            } else if (m == 5) {
                const T x4 = ws.a4[i];
                ws.w[i] = PADE_B(5) * x4 + PADE_B(3) * x2;
                ws.v[i] = PADE_B(4) * x4 + PADE_B(2) * x2;
            } else if (m == 7) {
                const T x4 = ws.a4[i], x6 = ws.a6[i];
                ws.w[i] = PADE_B(7) * x6 + PADE_B(5) * x4 + PADE_B(3) * x2;
                ws.v[i] = PADE_B(6) * x6 + PADE_B(4) * x4 + PADE_B(2) * x2;
            } else {  // m == 9
                const T x4 = ws.a4[i], x6 = ws.a6[i], x8 = ws.a8[i];
                ws.w[i] = PADE_B(9) * x8 + PADE_B(7) * x6 + PADE_B(5) * x4 + PADE_B(3) * x2;
                ws.v[i] = PADE_B(8) * x8 + PADE_B(6) * x6 + PADE_B(4) * x4 + PADE_B(2) * x2;
            }
        }
    }
    Team::sync();
    // add_diag on the main block: W += b1 I, V += b0 I.
    for (int i = Team::rank(); i < ws.n; i += Team::SIZE) {
        ws.w[i * ws.n + i] += PADE_B(1);
        ws.v[i * ws.n + i] += PADE_B(0);
    }
    Team::sync();
#undef PADE_B
}

// expm.rs `Workspace::run` on the input already in `a`. Afterwards r = e^A (if want_exp) and
// p = φ1(A) (if want_phi). Returns an ELRA_* status. The r/a8 buffers are swapped during the
// squaring phase, so `ws` is taken by reference and its r pointer is the result.
template <typename T, typename Team> __device__ int run(Ws<T, Team>& ws, bool want_exp, bool want_phi) {
    const int len = ws.len;
    if (!all_finite_(ws, ws.a, len)) return ELRA_NONFINITE_INPUT;
    // Structure of a plain input: balancing (f32), then exact triangularity (pairs: neither).
    const bool balanced = !ws.pair && Prec<T>::BALANCE && balance(ws);
    const int tri = ws.pair ? ELRA_TRI_NONE : detect_triangular(ws);
    int m = 0;
    long long s_sel = 0, s0 = 0;
    if (!select(ws, m, s_sel)) {
        double maxabs = 0.0;
        for (int i = Team::rank(); i < len; i += Team::SIZE) maxabs = fmax(maxabs, (double)abs_(ws.a[i]));
        maxabs = Team::max_nan(maxabs, ws.redd);
        const int cols = ws.pair ? 2 * ws.n : ws.n;
        const double lg = log2(maxabs) + log2((double)cols);
        s0 = (long long)fmax(ceil(lg - (Prec<T>::EMAX - 4.0) / Prec<T>::KMAX), 1.0);
        scale_pow2<T, Team>(ws.a, len, -s0);
        if (!select(ws, m, s_sel)) return ELRA_OVERFLOW;
    }
    const long long s_total = s_sel + s0;
    const long long s_max = 4 * ((long long)Prec<T>::EMAX + 1) + 64;
    if (s_total > s_max) return ELRA_OVERFLOW;
    if (s_sel > 0) {
        scale_pow2<T, Team>(ws.a, len, -s_sel);
        scale_pow2<T, Team>(ws.a2, len, -2 * s_sel);
        scale_pow2<T, Team>(ws.a4, len, -4 * s_sel);
        scale_pow2<T, Team>(ws.a6, len, -6 * s_sel);
        if (m == 9) scale_pow2<T, Team>(ws.a8, len, -8 * s_sel);
    }
    if (m == 9 && !ws.a8_formed) mul(ws, ws.a4, ws.a4, ws.a8);
    form_wv(ws, m);
    // U = A·W; D = V − U; N = V + U (in u).
    mul(ws, ws.a, ws.w, ws.u);
    for (int i = Team::rank(); i < len; i += Team::SIZE) {
        const T vi = ws.v[i];
        ws.d[i] = vi - ws.u[i];
        ws.u[i] += vi;
    }
    Team::sync();
    if (!lu_factor(ws, ws.d)) return ELRA_SINGULAR;
    const bool need_r = want_exp || s_total > 0;
    if (need_r) {
        copy<T, Team>(ws.u, ws.r, len);
        solve_pair(ws, ws.r);
    }
    if (want_phi) {
        const T two = T(1) + T(1);
        for (int i = Team::rank(); i < len; i += Team::SIZE) ws.p[i] = two * ws.w[i];
        Team::sync();
        solve_pair(ws, ws.p);
    }
    if (tri != ELRA_TRI_NONE) tri_stage(ws, s_total, need_r, want_phi);
    const T half = T(0.5);
    for (long long step = 0; step < s_total; ++step) {
        if (want_phi) {
            mul(ws, ws.r, ws.p, ws.t);
            for (int i = Team::rank(); i < len; i += Team::SIZE) ws.p[i] = half * (ws.p[i] + ws.t[i]);
            Team::sync();
        }
        mul(ws, ws.r, ws.r, ws.a8);
        T* tmp = ws.r;
        ws.r = ws.a8;
        ws.a8 = tmp;
        if (tri != ELRA_TRI_NONE) tri_stage(ws, s_total - step - 1, true, want_phi);
        const bool ok = all_finite_(ws, ws.r, len) && (!want_phi || all_finite_(ws, ws.p, len));
        if (!ok) return ELRA_OVERFLOW;
    }
    const bool ok = (!want_exp || all_finite_(ws, ws.r, len)) && (!want_phi || all_finite_(ws, ws.p, len));
    if (!ok) return ELRA_OVERFLOW;
    if (tri == ELRA_TRI_LOWER) {
        if (need_r) transpose_nn(ws, ws.r);
        if (want_phi) transpose_nn(ws, ws.p);
    }
    if (balanced) {
        if (need_r) unbalance(ws, ws.r);
        if (want_phi) unbalance(ws, ws.p);
        const bool ok2 = (!want_exp || all_finite_(ws, ws.r, ws.nn)) && (!want_phi || all_finite_(ws, ws.p, ws.nn));
        if (!ok2) return ELRA_OVERFLOW;
    }
    return ELRA_OK;
}

// Binds the workspace of this team: 12 buffers of `len` entries in dynamic shared memory (the
// team's slice of the block's) or in global scratch (the team's slice by global team index),
// plus the static shared vectors.
template <typename T, typename Team>
__device__ Ws<T, Team> bind(int n, bool pair, T* work, int use_shared, T* ell_v, T* ell_w, int* piv, T* tri, int* bal,
                      T* red, double* redd, int* sh_int) {
    Ws<T, Team> ws;
    ws.n = n;
    ws.nn = n * n;
    ws.pair = pair;
    ws.len = pair ? 2 * n * n : n * n;
    const size_t per_team = (size_t)ELRA_NBUF * (size_t)ws.len;
    T* base = use_shared ? reinterpret_cast<T*>(elra_dyn_smem) + (size_t)Team::index_in_block() * per_team
                         : work + (size_t)Team::global_index() * per_team;
    T** bufs[ELRA_NBUF] = {&ws.a, &ws.a2, &ws.a4, &ws.a6, &ws.a8, &ws.t,
                           &ws.w, &ws.v,  &ws.u,  &ws.d,  &ws.r,  &ws.p};
    for (int k = 0; k < ELRA_NBUF; ++k) *bufs[k] = base + (size_t)k * ws.len;
    ws.ell_v = ell_v;
    ws.ell_w = ell_w;
    ws.ell_steps = 0;
    ws.ell_exp = 0;
    ws.ell_zero = false;
    ws.ell_started = false;
    ws.a8_formed = false;
    ws.piv = piv;
    ws.tri = tri;
    ws.bal = bal;
    ws.red = red;
    ws.redd = redd;
    ws.sh_int = sh_int;
    return ws;
}

// One matrix per team (team index b < batch): E = e^Z and P = φ1(Z) (expm.rs `expm_phi1`).
template <typename T, typename Team>
__device__ void expm_phi1_team(const T* z_all, int n, long long batch, T* exp_all, T* phi_all, T* work, int use_shared,
                                int* status) {
    __shared__ T ell_v_[Team::MAX_PER_BLOCK][2 * ELRA_MAX_N], ell_w_[Team::MAX_PER_BLOCK][2 * ELRA_MAX_N],
        tri_[Team::MAX_PER_BLOCK][2 * ELRA_MAX_N], red_[Team::MAX_PER_BLOCK][ELRA_NWARPS];
    __shared__ double redd_[Team::MAX_PER_BLOCK][ELRA_NWARPS];
    __shared__ int piv_[Team::MAX_PER_BLOCK][ELRA_MAX_N], bal_[Team::MAX_PER_BLOCK][ELRA_MAX_N],
        sh_int_[Team::MAX_PER_BLOCK][1];
    const long long gb = Team::global_index();
    if (gb >= batch) return;  // a whole team leaves together (warp teams of the last block)
    const int ti = Team::index_in_block();
    T *ell_v = ell_v_[ti], *ell_w = ell_w_[ti], *red = red_[ti];
    double* redd = redd_[ti];
    int *piv = piv_[ti], *sh_int = sh_int_[ti];
    const size_t b = (size_t)gb, nn = (size_t)n * n;
    const T* z = z_all + b * nn;
    T* e_out = exp_all + b * nn;
    T* p_out = phi_all + b * nn;
    if (n < 1 || n > ELRA_MAX_N) {
        fill<T, Team>(e_out, (int)nn, quiet_nan<T>());
        fill<T, Team>(p_out, (int)nn, quiet_nan<T>());
        if (Team::rank() == 0) status[b] = ELRA_BAD_SIZE;
        return;
    }
    Ws<T, Team> ws = bind<T, Team>(n, false, work, use_shared, ell_v, ell_w, piv, tri_[ti], bal_[ti], red, redd, sh_int);
    copy<T, Team>(z, ws.a, (int)nn);
    const int st = run(ws, true, true);
    for (int i = Team::rank(); i < (int)nn; i += Team::SIZE) {
        e_out[i] = st == ELRA_OK ? ws.r[i] : quiet_nan<T>();
        p_out[i] = st == ELRA_OK ? ws.p[i] : quiet_nan<T>();
    }
    if (Team::rank() == 0) status[b] = st;
}

// One matrix per team: out = L_φ1(Zᵀ, G), the adjoint of the Fréchet derivative of φ1 at Z
// applied to G (the top-right block of φ1([[Zᵀ, G], [0, Zᵀ]]) on pairs, with G scaled by 2^k,
// k = round(log2(‖Zᵀ‖₁/‖G‖₁)), and the result by 2^-k; expm.rs `load_transposed`,
// `load_direction`, `run(pair)`).
template <typename T, typename Team>
__device__ void phi1_adjoint_team(const T* z_all, const T* g_all, int n, long long batch, T* out_all, T* work, int use_shared,
                                   int* status) {
    __shared__ T ell_v_[Team::MAX_PER_BLOCK][2 * ELRA_MAX_N], ell_w_[Team::MAX_PER_BLOCK][2 * ELRA_MAX_N],
        red_[Team::MAX_PER_BLOCK][ELRA_NWARPS];
    __shared__ double redd_[Team::MAX_PER_BLOCK][ELRA_NWARPS];
    __shared__ int piv_[Team::MAX_PER_BLOCK][ELRA_MAX_N], sh_int_[Team::MAX_PER_BLOCK][1];
    const long long gb = Team::global_index();
    if (gb >= batch) return;  // a whole team leaves together (warp teams of the last block)
    const int ti = Team::index_in_block();
    T *ell_v = ell_v_[ti], *ell_w = ell_w_[ti], *red = red_[ti];
    double* redd = redd_[ti];
    int *piv = piv_[ti], *sh_int = sh_int_[ti];
    const size_t b = (size_t)gb, nn = (size_t)n * n;
    const T* z = z_all + b * nn;
    const T* g = g_all + b * nn;
    T* out = out_all + b * nn;
    if (n < 1 || n > ELRA_MAX_N) {
        fill<T, Team>(out, (int)nn, quiet_nan<T>());
        if (Team::rank() == 0) status[b] = ELRA_BAD_SIZE;
        return;
    }
    // (pairs never use tri/bal: no structure path for the block matrices)
    Ws<T, Team> ws = bind<T, Team>(n, true, work, use_shared, ell_v, ell_w, piv, nullptr, nullptr, red, redd, sh_int);
    const int N = n;
    // a = (Zᵀ, G)
    for (int idx = Team::rank(); idx < (int)nn; idx += Team::SIZE) {
        const int i = idx / N, j = idx - i * N;
        ws.a[idx] = z[j * N + i];
        ws.a[nn + idx] = g[idx];
    }
    Team::sync();
    int st;
    if (!all_finite_(ws, ws.a, 2 * (int)nn)) {
        st = ELRA_NONFINITE_INPUT;
    } else {
        // load_direction: k = round(log2(target) − log2(‖G‖)), target = ‖Zᵀ‖ or 1 when Zᵀ = 0.
        long long pre = 0;
        double ne = norm1(ws, ws.a + nn, (int)nn);
        if (isinf(ne)) {
            // finite entries whose 1-norm overflows: scale down exactly before measuring
            pre = -64;
            scale_pow2<T, Team>(ws.a + nn, (int)nn, pre);
            ne = norm1(ws, ws.a + nn, (int)nn);
        }
        if (ne == 0.0) {
            // E = 0: L = 0 (linear in E).
            for (int i = Team::rank(); i < (int)nn; i += Team::SIZE) out[i] = T(0);
            if (Team::rank() == 0) status[b] = ELRA_OK;
            return;
        }
        const double na = norm1(ws, ws.a, (int)nn);
        const double target = (na > 0.0 && isfinite(na)) ? na : 1.0;
        const long long k = pre + (long long)round(log2(target) - log2(ne));
        scale_pow2<T, Team>(ws.a + nn, (int)nn, k - pre);
        st = run(ws, false, true);
        if (st == ELRA_OK) {
            scale_pow2<T, Team>(ws.p + nn, (int)nn, -k);
            if (!all_finite_(ws, ws.p + nn, (int)nn)) st = ELRA_OVERFLOW;
        }
    }
    for (int i = Team::rank(); i < (int)nn; i += Team::SIZE) out[i] = st == ELRA_OK ? ws.p[nn + i] : quiet_nan<T>();
    if (Team::rank() == 0) status[b] = st;
}

}  // namespace pade
}  // namespace elra

// ---- entry points: {op}_{dtype} (a block team per matrix: grid = batch blocks of ELRA_BLOCK
// threads) and {op}_warp_{dtype} (a warp team per matrix: blocks of blockDim.x = W·ELRA_WARP
// threads, W ≤ ELRA_NWARPS matrices each, grid = ⌈batch / W⌉; the dynamic shared memory, when
// used, holds W workspaces) -------------------------------------------------------------------

#define ELRA_PHI1_ENTRIES(T, SUFFIX)                                                                               \
    extern "C" __global__ void __launch_bounds__(ELRA_BLOCK)                                                       \
        expm_phi1_##SUFFIX(const T* z, int n, int batch, T* exp_out, T* phi_out, T* work, int use_shared,         \
                           int* status) {                                                                          \
        elra::pade::expm_phi1_team<T, elra::pade::BlockTeam>(z, n, batch, exp_out, phi_out, work, use_shared,     \
                                                             status);                                              \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ELRA_BLOCK)                                                       \
        expm_phi1_warp_##SUFFIX(const T* z, int n, int batch, T* exp_out, T* phi_out, T* work, int use_shared,    \
                                int* status) {                                                                     \
        elra::pade::expm_phi1_team<T, elra::pade::WarpTeam>(z, n, batch, exp_out, phi_out, work, use_shared,      \
                                                            status);                                               \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ELRA_BLOCK)                                                       \
        phi1_adjoint_##SUFFIX(const T* z, const T* g, int n, int batch, T* out, T* work, int use_shared,          \
                              int* status) {                                                                       \
        elra::pade::phi1_adjoint_team<T, elra::pade::BlockTeam>(z, g, n, batch, out, work, use_shared, status);   \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ELRA_BLOCK)                                                       \
        phi1_adjoint_warp_##SUFFIX(const T* z, const T* g, int n, int batch, T* out, T* work, int use_shared,     \
                                   int* status) {                                                                  \
        elra::pade::phi1_adjoint_team<T, elra::pade::WarpTeam>(z, g, n, batch, out, work, use_shared, status);    \
    }

ELRA_PHI1_ENTRIES(float, f32)
ELRA_PHI1_ENTRIES(double, f64)
