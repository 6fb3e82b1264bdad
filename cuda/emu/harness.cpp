// CPU emulation harness for cuda/phi1.cu and cuda/grams.cu (see cuda_emu.hpp). Reads one job from
// stdin, runs the kernel block by block with ELRA_BLOCK threads each, writes the results to stdout.
//
// Input (whitespace-separated; floats as the hex of their IEEE bits):
//   expm_phi1    f32|f64 n batch use_shared team   z[batch·n·n]
//   phi1_adjoint f32|f64 n batch use_shared team   z[batch·n·n] g[batch·n·n]
// (team: 0 = a block per matrix, 1 = a warp per matrix; here a block is one warp of ELRA_BLOCK)
//   adapter_grams f32|f64 d r batch           A[batch·d·r] C[batch·r·d]
// Output: `status s_0 … s_{batch−1}` then one line per output array (same hex encoding):
//   expm_phi1: exp, phi1; phi1_adjoint: out; adapter_grams: Z, S, K, SK, energy.
#include "cuda_emu.hpp"
#include "phi1.cu"
#include "grams.cu"

#include <cinttypes>
#include <cstdio>
#include <functional>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

thread_local EmuDim3 threadIdx;
thread_local EmuDim3 blockIdx;
EmuBlock emu_block;
alignas(16) unsigned char elra_dyn_smem[12 * 2 * ELRA_MAX_N * ELRA_MAX_N * sizeof(double)];

template <typename T> struct Bits;
template <> struct Bits<float> {
    using U = uint32_t;
};
template <> struct Bits<double> {
    using U = uint64_t;
};

template <typename T> std::vector<T> read_vec(size_t len) {
    std::vector<T> v(len);
    for (size_t i = 0; i < len; ++i) {
        std::string tok;
        if (!(std::cin >> tok)) {
            std::fprintf(stderr, "harness: input ended early\n");
            std::exit(2);
        }
        typename Bits<T>::U u = (typename Bits<T>::U)std::stoull(tok, nullptr, 16);
        std::memcpy(&v[i], &u, sizeof(T));
    }
    return v;
}

template <typename T> void write_vec(const char* name, const std::vector<T>& v) {
    std::printf("%s", name);
    for (const T& x : v) {
        typename Bits<T>::U u;
        std::memcpy(&u, &x, sizeof(T));
        std::printf(" %llx", (unsigned long long)u);
    }
    std::printf("\n");
}

// Runs `kernel` for blocks 0..batch−1, ELRA_BLOCK threads each, one block at a time.
static void launch(int batch, const std::function<void()>& kernel) {
    for (int b = 0; b < batch; ++b) {
        std::barrier<> bar(ELRA_BLOCK);
        emu_block.bar = &bar;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < ELRA_BLOCK; ++t) {
            threads.emplace_back([&, t] {
                threadIdx.x = t;
                blockIdx.x = (unsigned)b;
                kernel();
            });
        }
        for (auto& th : threads) th.join();
        emu_block.bar = nullptr;
    }
}

static void write_status(const std::vector<int>& st) {
    std::printf("status");
    for (int s : st) std::printf(" %d", s);
    std::printf("\n");
}

template <typename T> int run_job(const std::string& op) {
    if (op == "expm_phi1" || op == "phi1_adjoint") {
        int n, batch, use_shared, team;
        std::cin >> n >> batch >> use_shared >> team;
        const size_t nn = (size_t)n * n, total = nn * batch;
        std::vector<T> z = read_vec<T>(total), g;
        if (op == "phi1_adjoint") g = read_vec<T>(total);
        const size_t len = op == "phi1_adjoint" ? 2 * nn : nn;
        std::vector<T> work(use_shared ? 1 : 12 * len * batch);
        std::vector<int> status(batch, -1);
        if (op == "expm_phi1") {
            std::vector<T> e(total, T(-7)), p(total, T(-7));
            launch(batch, [&] {
                if (team)
                    elra::pade::expm_phi1_team<T, elra::pade::WarpTeam>(z.data(), n, batch, e.data(), p.data(),
                                                                        work.data(), use_shared, status.data());
                else
                    elra::pade::expm_phi1_team<T, elra::pade::BlockTeam>(z.data(), n, batch, e.data(), p.data(),
                                                                         work.data(), use_shared, status.data());
            });
            write_status(status);
            write_vec("exp", e);
            write_vec("phi1", p);
        } else {
            std::vector<T> out(total, T(-7));
            launch(batch, [&] {
                if (team)
                    elra::pade::phi1_adjoint_team<T, elra::pade::WarpTeam>(z.data(), g.data(), n, batch, out.data(),
                                                                           work.data(), use_shared, status.data());
                else
                    elra::pade::phi1_adjoint_team<T, elra::pade::BlockTeam>(z.data(), g.data(), n, batch, out.data(),
                                                                            work.data(), use_shared, status.data());
            });
            write_status(status);
            write_vec("out", out);
        }
        return 0;
    }
    if (op == "adapter_grams") {
        int d, r, batch;
        std::cin >> d >> r >> batch;
        const size_t dr = (size_t)d * r, rr = (size_t)r * r;
        std::vector<T> A = read_vec<T>(dr * batch), C = read_vec<T>(dr * batch);
        std::vector<T> Z(rr * batch, T(-7)), S(rr * batch, T(-7)), K(rr * batch, T(-7)), SK(rr * batch, T(-7)),
            en(batch, T(-7));
        std::vector<int> status(batch, -1);
        launch(batch, [&] {
            elra::adapter_grams<T>(A.data(), C.data(), d, r, Z.data(), S.data(), K.data(), SK.data(), en.data(),
                                   status.data());
        });
        write_status(status);
        write_vec("z", Z);
        write_vec("s", S);
        write_vec("k", K);
        write_vec("sk", SK);
        write_vec("energy", en);
        return 0;
    }
    std::fprintf(stderr, "harness: unknown op %s\n", op.c_str());
    return 2;
}

int main() {
    std::string op, dtype;
    if (!(std::cin >> op >> dtype)) return 2;
    if (dtype == "f32") return run_job<float>(op);
    if (dtype == "f64") return run_job<double>(op);
    std::fprintf(stderr, "harness: unknown dtype %s\n", dtype.c_str());
    return 2;
}
