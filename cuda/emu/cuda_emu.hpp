// CPU emulation of the CUDA constructs used by cuda/*.cu, so that the kernels can be compiled by
// a host C++20 compiler and run on the CPU: one OS thread per CUDA thread of a block, a
// std::barrier for __syncthreads, function-scope `static` for __shared__ (one block runs at a
// time), IEEE float/double arithmetic without contraction (-ffp-contract=off) and the host libm.
// Used by the emulation tests of tests/cuda_phi1.rs (emu/harness.cpp: the r×r kernels) and
// tests/cuda_skinny_emu.rs (emu/skinny_harness.cpp: the skinny kernels and the non-finite scan).
#pragma once
#define ELRA_EMULATE 1

#include <math.h>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __constant__ static
#define __shared__ static
#define __align__(n) alignas(n)

#define ELRA_DYNAMIC_SHARED(name) extern unsigned char name[]

struct EmuDim3 {
    unsigned x = 0, y = 0, z = 0;
};
extern thread_local EmuDim3 threadIdx;
extern thread_local EmuDim3 blockIdx;

struct EmuBlock {
    std::barrier<>* bar = nullptr;
    std::atomic<int> or_acc{0};
};
extern EmuBlock emu_block;

inline void __syncthreads() { emu_block.bar->arrive_and_wait(); }

inline int __syncthreads_or(int p) {
    emu_block.bar->arrive_and_wait();
    if (threadIdx.x == 0) emu_block.or_acc.store(0);
    emu_block.bar->arrive_and_wait();
    if (p) emu_block.or_acc.fetch_or(1);
    emu_block.bar->arrive_and_wait();
    const int r = emu_block.or_acc.load();
    emu_block.bar->arrive_and_wait();
    return r;
}

// Warp-level operations. The emulation runs blocks of at most 32 threads (ELRA_BLOCK), so a
// block is one warp, and cuda/ only calls these from code that every thread of the warp (here:
// the block) reaches together: a block barrier is then a faithful warp barrier.
#ifndef ELRA_BLOCK
#error "the emulation needs ELRA_BLOCK (at most 32) defined on the command line"
#endif
static_assert(ELRA_BLOCK <= 32, "the emulation runs one warp per block");

inline void __syncwarp(unsigned = 0xffffffffu) { __syncthreads(); }

inline int __any_sync(unsigned, int p) { return __syncthreads_or(p); }

// One block runs at a time, but its threads are OS threads: a real atomic.
inline unsigned atomicOr(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_or(v); }

// Every emulated launch runs blocks of ELRA_BLOCK threads.
#define blockDim (EmuDim3{ELRA_BLOCK, 1, 1})

template <typename T> inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    static T slot[ELRA_BLOCK];
    slot[threadIdx.x] = v;
    __syncthreads();
    const T r = slot[(threadIdx.x ^ (unsigned)lane_mask) % ELRA_BLOCK];
    __syncthreads();
    return r;
}

inline float __int_as_float(int x) {
    float f;
    std::memcpy(&f, &x, sizeof f);
    return f;
}
inline double __longlong_as_double(long long x) {
    double d;
    std::memcpy(&d, &x, sizeof d);
    return d;
}
inline long long __double_as_longlong(double d) {
    long long x;
    std::memcpy(&x, &d, sizeof x);
    return x;
}
