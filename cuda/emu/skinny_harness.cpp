// CPU emulation harness for cuda/skinny.cu and cuda/finite.cu (see cuda_emu.hpp): one job from stdin, the kernel run
// block by block (grid x and y) with ELRA_BLOCK threads each, results to stdout. Used by the
// `cuda_layer_kernels_emulated_on_cpu_*` and `check_finite_emulated_on_cpu` tests in
// tests/cuda_skinny_emu.rs.
//
// Activation data travel as the IEEE bits of f32 values (already representable in the dtype;
// outputs are widened back to f32). `__half` uses the compiler's _Float16 (round to nearest even);
// `__nv_bfloat16` rounds to nearest even by hand.
//
// Jobs (integers decimal, floats as hex bits of f32):
//   rows_fused DT n_rows n_in n_out r rpw gx ld_in ld_out off has_base alias has_out has_mm m_scale cs0 cs1
//              ms0 ms1 as0 as1 len_cm len_mm len_am | in base cm mm am            -> v t out pad
//   col_reduce DT n_rows n r rows_per_chunk ldy off ss0 ss1 os0 os1 alpha beta len_s len_out | Y S out0 -> out
//   merge_apply DT d k r alias ld off gy scale ls0 ls1 rs0 rs1 len_l len_r | W L R             -> w pad
//   check_finite DT rows cols ld off gx gy flag0 | X                                          -> flag
//   multi DT n d k count rpw gx ld_x ld_y has_bias | index (decimal) X Y0 bias, per adapter:
//         from_x r has_mm m_scale | cm mm am                            -> seg perm y pad
//         (cm: ELRA Cᵀ d×r, LoRA lora_A r×k; mm r×r; am d×r; all row-major, dense)
//   multi_prep d count, per adapter: r has_b lda ldb mult alpha | eta A (d×lda) B (r×ldb) -> ct z (per adapter)
//
// Activation matrices are laid out with row stride ld (≥ cols) starting `off` elements after a
// 64-byte aligned address (off = 0 with ld a multiple of 8 takes the vector paths; an odd off or
// ld the scalar ones); the gaps hold NaN in inputs and the sentinel -7 in outputs, and `pad`
// reports how many gap entries of the output buffer changed (must be 0). rows_fused: `rpw` rows
// per warp and `gx` blocks (a grid-stride loop covers the rest); alias 1: out = base, alias 2:
// in = base = out (in place; n_in = n_out, ld_in = ld_out, the base input is ignored). merge_apply:
// `gy` row blocks. check_finite: a (gx, gy) grid over X (its gaps hold NaN, which must not be
// read), the flag starting at flag0 (decimal); `flag` is its value afterwards.
//   small_gemm m n kk alpha beta as0 as1 bs0 bs1 cs0 cs1 len_a len_b len_c | A B C0              -> c
//   factor_c d r has_b mult alpha | A B eta                                                        -> ct
//   factor_backward d r has_b acc lambda alpha mult | A Ct S K eta Abar CbarT Bbar0 etabar0    -> abar cbar_t bbar etabar
//     (acc 1: B̄ and ∂η are added to Bbar0 / etabar0; acc 0: overwritten, the initial values unread)
#include "cuda_emu.hpp"

#include <cstdint>
#include <cstring>

struct __half {
    _Float16 h;
};
struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __half2float(__half x) { return (float)x.h; }
inline __half __ushort_as_half(unsigned short b) {
    __half h;
    std::memcpy(&h, &b, 2);
    return h;
}
inline unsigned short __half_as_ushort(__half h) {
    unsigned short b;
    std::memcpy(&b, &h, 2);
    return b;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "16-bit activation types");

// The grid of the launch (set per block by launch() below).
thread_local EmuDim3 gridDim;

// Small tiles so that the emulated tests cross several column tiles cheaply.
#define ELRA_SKINNY_TILE_CHUNKS 1
inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }
inline float __bfloat162float(__nv_bfloat16 x) {
    uint32_t u = (uint32_t)x.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40)};  // quiet NaN
    const uint32_t lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb;
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}

#include "skinny.cu"
#include "finite.cu"

#include <functional>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

thread_local EmuDim3 threadIdx;
thread_local EmuDim3 blockIdx;
EmuBlock emu_block;

static std::vector<float> read_f32(size_t len) {
    std::vector<float> v(len);
    for (size_t i = 0; i < len; ++i) {
        std::string tok;
        if (!(std::cin >> tok)) {
            std::fprintf(stderr, "skinny harness: input ended early\n");
            std::exit(2);
        }
        uint32_t u = (uint32_t)std::stoul(tok, nullptr, 16);
        std::memcpy(&v[i], &u, 4);
    }
    return v;
}

static float read_hex() { return read_f32(1)[0]; }

static void write_f32(const char* name, const std::vector<float>& v) {
    std::printf("%s", name);
    for (float x : v) {
        uint32_t u;
        std::memcpy(&u, &x, 4);
        std::printf(" %x", u);
    }
    std::printf("\n");
}

template <typename T> static std::vector<T> to_t(const std::vector<float>& v) {
    std::vector<T> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = elra::skinny::from_f32<T>(v[i]);
    return o;
}
template <typename T> static std::vector<float> from_t(const std::vector<T>& v) {
    std::vector<float> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = elra::skinny::to_f32(v[i]);
    return o;
}

// Runs `kernel` for blocks (x, y), x < gx, y < gy, one block at a time, ELRA_BLOCK threads each.
static void launch(unsigned gx, unsigned gy, const std::function<void()>& kernel) {
    for (unsigned by = 0; by < gy; ++by)
        for (unsigned bx = 0; bx < gx; ++bx) {
            std::barrier<> bar(ELRA_BLOCK);
            emu_block.bar = &bar;
            std::vector<std::thread> threads;
            for (unsigned t = 0; t < ELRA_BLOCK; ++t)
                threads.emplace_back([&, t] {
                    threadIdx.x = t;
                    blockIdx.x = bx;
                    blockIdx.y = by;
                    gridDim.x = gx;
                    gridDim.y = gy;
                    kernel();
                });
            for (auto& th : threads) th.join();
            emu_block.bar = nullptr;
        }
}

static unsigned blocks(long long total) { return (unsigned)((total + ELRA_BLOCK - 1) / ELRA_BLOCK); }

// A rows × cols matrix of T with row stride ld, starting off elements after a 64-byte aligned
// address inside `buf`; the other entries of buf are gaps.
template <typename T> struct Strided {
    long long rows, cols, ld, start;
    std::vector<T> buf;
    Strided(long long rows_, long long cols_, long long ld_, long long off, float gap)
        : rows(rows_), cols(cols_), ld(ld_) {
        buf.assign(rows * ld + off + 64, elra::skinny::from_f32<T>(gap));
        const uintptr_t a = (uintptr_t)buf.data();
        start = (long long)(((a + 63) / 64 * 64 - a) / sizeof(T)) + off;
    }
    T* at() { return buf.data() + start; }
    bool in_matrix(long long idx) const {
        const long long rel = idx - start;
        return rel >= 0 && rel / ld < rows && rel % ld < cols;
    }
    void set(const std::vector<float>& v) {
        for (long long i = 0; i < rows; ++i)
            for (long long j = 0; j < cols; ++j) buf[start + i * ld + j] = elra::skinny::from_f32<T>(v[i * cols + j]);
    }
    std::vector<float> get() const {
        std::vector<float> v(rows * cols);
        for (long long i = 0; i < rows; ++i)
            for (long long j = 0; j < cols; ++j) v[i * cols + j] = elra::skinny::to_f32(buf[start + i * ld + j]);
        return v;
    }
    void fill_gaps(float x) {
        for (long long idx = 0; idx < (long long)buf.size(); ++idx)
            if (!in_matrix(idx)) buf[idx] = elra::skinny::from_f32<T>(x);
    }
    long long gap_changes(const std::vector<T>& before) const {
        long long n = 0;
        for (long long idx = 0; idx < (long long)buf.size(); ++idx)
            if (!in_matrix(idx) && std::memcmp(&buf[idx], &before[idx], sizeof(T)) != 0) ++n;
        return n;
    }
};

template <typename T> static int job_typed(const std::string& op) {
    if (op == "rows_fused") {
        long long n_rows, n_in, n_out, r, rpw, gx, ld_in, ld_out, off, has_base, alias, has_out, has_mm, cs0, cs1,
            ms0, ms1, as0, as1, lc, lm, la;
        std::cin >> n_rows >> n_in >> n_out >> r >> rpw >> gx >> ld_in >> ld_out >> off >> has_base >> alias >>
            has_out >> has_mm;
        const float m_scale = read_hex();
        std::cin >> cs0 >> cs1 >> ms0 >> ms1 >> as0 >> as1 >> lc >> lm >> la;
        const std::vector<float> in_v = read_f32(n_rows * n_in);
        const std::vector<float> base_v = has_base ? read_f32(n_rows * n_out) : std::vector<float>();
        std::vector<float> cm = read_f32(lc), mm = read_f32(lm), am = read_f32(la);
        Strided<T> in(n_rows, n_in, ld_in, off, NAN), base(n_rows, n_out, ld_out, off, NAN),
            out_sep(n_rows, n_out, ld_out, off, -7.0f);
        in.set(in_v);
        if (has_base) base.set(base_v);
        T* in_p = in.at();
        T* base_p = has_base ? base.at() : nullptr;
        Strided<T>* out_buf = &out_sep;
        if (alias == 1) out_buf = &base;
        if (alias == 2) base_p = in_p, out_buf = &in;
        T* out_p = has_out ? out_buf->at() : nullptr;
        // Gaps of the output buffer hold -7 (so that `pad` counts changes).
        if (alias != 0) out_buf->fill_gaps(-7.0f);
        const std::vector<T> before = out_buf->buf;
        std::vector<float> v(n_rows * r, -7.0f), t(n_rows * r, -7.0f);
        launch((unsigned)gx, 1, [&] {
            elra::skinny::rows_fused<T>((int)n_rows, (int)rpw, (int)n_in, (int)n_out, (int)r, in_p, ld_in, base_p,
                                        ld_out, out_p, ld_out, cm.data(), cs0, cs1, has_mm ? mm.data() : nullptr, ms0,
                                        ms1, m_scale, am.data(), as0, as1, v.data(), t.data());
        });
        write_f32("v", v);
        write_f32("t", t);
        write_f32("out", out_buf->get());
        write_f32("pad", {(float)out_buf->gap_changes(before)});
        return 0;
    }
    if (op == "col_reduce") {
        long long n_rows, n, r, rpc, ldy, off, ss0, ss1, os0, os1, ls, lo;
        std::cin >> n_rows >> n >> r >> rpc >> ldy >> off >> ss0 >> ss1 >> os0 >> os1;
        const float alpha = read_hex(), beta = read_hex();
        std::cin >> ls >> lo;
        Strided<T> Y(n_rows, n, ldy, off, NAN);
        Y.set(read_f32(n_rows * n));
        std::vector<float> S = read_f32(ls), out = read_f32(lo);
        const long long chunks = (n_rows + rpc - 1) / rpc;
        std::vector<float> partial(chunks * n * r, -7.0f);
        launch((unsigned)((n + ELRA_CR_COLS - 1) / ELRA_CR_COLS), (unsigned)chunks, [&] {
            elra::skinny::col_reduce_partial<T>((int)n_rows, (int)n, (int)r, (int)rpc, Y.at(), ldy, S.data(), ss0, ss1,
                                                partial.data());
        });
        launch(blocks(n * r), 1, [&] {
            elra::skinny::col_reduce_finish((int)n, (int)r, (int)chunks, partial.data(), alpha, beta, out.data(), os0,
                                            os1);
        });
        write_f32("out", out);
        return 0;
    }
    if (op == "merge_apply") {
        long long d, k, r, alias, ld, off, gy, ls0, ls1, rs0, rs1, ll, lr;
        std::cin >> d >> k >> r >> alias >> ld >> off >> gy;
        const float scale = read_hex();
        std::cin >> ls0 >> ls1 >> rs0 >> rs1 >> ll >> lr;
        Strided<T> W(d, k, ld, off, NAN), Wo(d, k, ld, off, -7.0f);
        W.set(read_f32(d * k));
        std::vector<float> L = read_f32(ll), R = read_f32(lr);
        Strided<T>& out = alias ? W : Wo;
        out.fill_gaps(-7.0f);
        const std::vector<T> before = out.buf;
        launch((unsigned)((k + ELRA_MA_COLS - 1) / ELRA_MA_COLS), (unsigned)gy, [&] {
            elra::skinny::merge_apply<T>((int)d, (int)k, (int)r, W.at(), ld, out.at(), ld, scale, L.data(), ls0, ls1,
                                         R.data(), rs0, rs1);
        });
        write_f32("w", out.get());
        write_f32("pad", {(float)out.gap_changes(before)});
        return 0;
    }
    if (op == "multi") {
        // The device half of the multi-adapter forward after the base GEMM and φ1: counts,
        // segments and permutation, the row passes in launch batches, the bias and bad-index pass.
        long long n, d, k, count, rpw, gx, ld_x, ld_y, has_bias;
        std::cin >> n >> d >> k >> count >> rpw >> gx >> ld_x >> ld_y >> has_bias;
        std::vector<int> index(n);
        for (auto& v : index) std::cin >> v;
        Strided<T> X(n, k, ld_x, 0, NAN), Y(n, d, ld_y, 0, -7.0f);
        X.set(read_f32(n * k));
        Y.set(read_f32(n * d));
        std::vector<T> bias = has_bias ? to_t<T>(read_f32(d)) : std::vector<T>();
        std::vector<std::vector<float>> cms(count), mms(count), ams(count);
        std::vector<elra::skinny::MultiRowsAdapter> ads(count);
        for (long long a = 0; a < count; ++a) {
            long long from_x, r, has_mm;
            std::cin >> from_x >> r >> has_mm;
            const float m_scale = read_hex();
            const long long n_in = from_x ? k : d;
            cms[a] = read_f32(n_in * r);
            if (has_mm) mms[a] = read_f32(r * r);
            ams[a] = read_f32(d * r);
            auto& m = ads[a];
            m.cm = cms[a].data();
            m.cs0 = from_x ? k : 1;  // LoRA: lora_A r×k row-major; ELRA: Cᵀ d×r
            m.cs1 = from_x ? 1 : r;
            m.mm = has_mm ? mms[a].data() : nullptr;
            m.ms0 = r, m.ms1 = 1, m.m_scale = m_scale;
            m.am = ams[a].data();
            m.as0 = r, m.as1 = 1;
            m.adapter = (int)a, m.r = (int)r, m.from_x = (int)from_x;
        }
        const std::vector<T> before = Y.buf;
        std::vector<int> counts(count > 0 ? count : 1, -7), seg(count + 1, -7), perm(n, -7);
        if (count > 0) {
            launch((unsigned)count, 1, [&] { multi_count_i32((int)n, index.data(), counts.data()); });
            launch((unsigned)count, 1, [&] {
                multi_perm_i32((int)n, index.data(), (int)count, counts.data(), seg.data(), perm.data());
            });
            for (long long a0 = 0; a0 < count; a0 += ELRA_MULTI_PER_LAUNCH) {
                elra::skinny::MultiRowsBatch batch{};
                batch.count = (int)std::min<long long>(ELRA_MULTI_PER_LAUNCH, count - a0);
                for (int i = 0; i < batch.count; ++i) batch.a[i] = ads[a0 + i];
                launch((unsigned)gx, (unsigned)batch.count, [&] {
                    elra::skinny::rows_multi<T>(batch, seg.data(), perm.data(), (int)rpw, (int)d, (int)k, X.at(),
                                                ld_x, Y.at(), ld_y);
                });
            }
        }
        launch(3, 1, [&] {
            elra::skinny::multi_finish<T>((int)n, (int)d, Y.at(), ld_y, has_bias ? bias.data() : nullptr,
                                          index.data(), (int)count);
        });
        std::vector<float> segf(seg.begin(), seg.end()), permf(perm.begin(), perm.end());
        write_f32("seg", segf);
        write_f32("perm", permf);
        write_f32("y", Y.get());
        write_f32("pad", {(float)Y.gap_changes(before)});
        return 0;
    }
    if (op == "check_finite") {
        long long rows, cols, ld, off, gx, gy;
        unsigned flag;
        std::cin >> rows >> cols >> ld >> off >> gx >> gy >> flag;
        Strided<T> X(rows, cols, ld, off, NAN);
        X.set(read_f32(rows * cols));
        launch((unsigned)gx, (unsigned)gy, [&] { elra::finite::check_finite<T>(rows, cols, X.at(), ld, &flag); });
        write_f32("flag", {(float)flag});
        return 0;
    }
    std::fprintf(stderr, "skinny harness: unknown op %s\n", op.c_str());
    return 2;
}

int main() {
    std::string op;
    if (!(std::cin >> op)) return 2;
    if (op == "rows_fused" || op == "col_reduce" || op == "merge_apply" || op == "check_finite" || op == "multi") {
        std::string dt;
        std::cin >> dt;
        if (dt == "f32") return job_typed<float>(op);
        if (dt == "f16") return job_typed<__half>(op);
        if (dt == "bf16") return job_typed<__nv_bfloat16>(op);
        std::fprintf(stderr, "skinny harness: unknown dtype %s\n", dt.c_str());
        return 2;
    }
    if (op == "small_gemm") {
        long long m, n, kk, as0, as1, bs0, bs1, cs0, cs1, la, lb, lc;
        std::cin >> m >> n >> kk;
        const float alpha = read_hex(), beta = read_hex();
        std::cin >> as0 >> as1 >> bs0 >> bs1 >> cs0 >> cs1 >> la >> lb >> lc;
        std::vector<float> A = read_f32(la), B = read_f32(lb), C = read_f32(lc);
        launch(blocks(m * n), 1, [&] {
            small_gemm_f32((int)m, (int)n, (int)kk, alpha, A.data(), as0, as1, B.data(), bs0, bs1, beta, C.data(),
                           cs0, cs1);
        });
        write_f32("c", C);
        return 0;
    }
    if (op == "factor_c") {
        long long d, r, has_b;
        std::cin >> d >> r >> has_b;
        const float mult = read_hex(), alpha = read_hex();
        std::vector<float> A = read_f32(d * r), B = has_b ? read_f32(d * r) : std::vector<float>(), eta = read_f32(1);
        std::vector<float> Ct(d * r, -7.0f);
        launch(blocks(d * r), 1, [&] {
            factor_c_f32((int)d, (int)r, A.data(), has_b ? B.data() : nullptr, eta.data(), mult, alpha, Ct.data());
        });
        write_f32("ct", Ct);
        return 0;
    }
    if (op == "multi_prep") {
        long long d, count;
        std::cin >> d >> count;
        std::vector<std::vector<float>> As(count), Bs(count), etas(count), cts(count), zs(count);
        std::vector<MultiPrepAdapter> ads(count);
        for (long long a = 0; a < count; ++a) {
            long long r, has_b, lda, ldb;
            std::cin >> r >> has_b >> lda >> ldb;
            const float mult = read_hex(), alpha = read_hex();
            etas[a] = read_f32(1);
            As[a] = read_f32(d * lda);
            if (has_b) Bs[a] = read_f32(r * ldb);
            cts[a].assign(d * r, -7.0f);
            zs[a].assign(r * r, -7.0f);
            ads[a] = MultiPrepAdapter{As[a].data(), lda, has_b ? Bs[a].data() : nullptr, ldb,
                                                    etas[a].data(), mult, alpha, (int)r, cts[a].data(), zs[a].data()};
        }
        for (long long a0 = 0; a0 < count; a0 += ELRA_MULTI_PER_LAUNCH) {
            MultiPrepBatch batch{};
            batch.count = (int)std::min<long long>(ELRA_MULTI_PER_LAUNCH, count - a0);
            batch.d = (int)d;
            for (int i = 0; i < batch.count; ++i) batch.a[i] = ads[a0 + i];
            launch((unsigned)batch.count, 1, [&] { multi_prep_f32(batch); });
        }
        for (long long a = 0; a < count; ++a) {
            write_f32("ct", cts[a]);
            write_f32("z", zs[a]);
        }
        return 0;
    }
    if (op == "factor_backward") {
        long long d, r, has_b, acc;
        std::cin >> d >> r >> has_b >> acc;
        const float lambda = read_hex(), alpha = read_hex(), mult = read_hex();
        std::vector<float> A = read_f32(d * r), Ct = read_f32(d * r), S = read_f32(r * r), K = read_f32(r * r),
                           eta = read_f32(1), Abar = read_f32(d * r), CbarT = read_f32(d * r),
                           Bbar = read_f32(d * r), etabar = read_f32(1);
        launch(blocks(d * r), 1, [&] {
            factor_backward_f32((int)d, (int)r, A.data(), Ct.data(), S.data(), K.data(), lambda, alpha, eta.data(),
                                mult, Abar.data(), CbarT.data(), has_b ? Bbar.data() : nullptr, (int)acc);
        });
        launch(1, 1, [&] {
            factor_eta_f32((int)d, (int)r, Ct.data(), CbarT.data(), eta.data(), mult, etabar.data(), (int)acc);
        });
        write_f32("abar", Abar);
        write_f32("cbar_t", CbarT);
        write_f32("bbar", Bbar);
        write_f32("etabar", etabar);
        return 0;
    }
    std::fprintf(stderr, "skinny harness: unknown op %s\n", op.c_str());
    return 2;
}
