// emulate.cuh -- a tiny host-side CUDA emulator, for checking the kernels without a GPU.
//
// Build a host program with g++ -DCDK_EMULATE, include this header first, then the .cu files
// (their host launchers are compiled out under CDK_EMULATE), and call the kernels through
// cdk_emu::launch(grid, block, dyn_smem_bytes, [&] { kernel(args...); }).
//
// Each CUDA thread is a ucontext coroutine; the blocks of a grid run one after another. Every
// __syncthreads and every warp collective (__shfl_sync, __shfl_xor_sync, __all_sync) is a real
// rendezvous: a thread blocks there until all threads of its block (resp. warp) arrive, and the
// scheduler switches threads only at those points, so a missing barrier, a collective executed
// by only part of a warp, or a shared-memory race across a barrier shows up as a wrong result
// or a reported deadlock. __shared__ variables are function statics (one block at a time).
// Not emulated: memory-model subtleties within a warp, timing, and real float atomics order.
// This header is for tests only; setup.py never compiles it (it builds csrc/cuda/*.cu only).
#pragma once
#ifndef CDK_EMULATE
#error "emulate.cuh is for host-only emulation builds (-DCDK_EMULATE)"
#endif

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <ucontext.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <vector>

namespace cdk_emu {

struct Barrier {
  int count = 0;
  unsigned gen = 0;
};
struct Thread {
  ucontext_t ctx;
  uint3 tid;
  bool done = false;
  const Barrier* wait_bar = nullptr;  // blocked on this barrier while its gen == wait_gen
  unsigned wait_gen = 0;
  std::unique_ptr<char[]> stack;
};

inline Thread* g_cur = nullptr;
inline ucontext_t g_sched;
inline uint3 g_block_idx;
inline dim3 g_block_dim, g_grid_dim;
inline std::vector<float> g_dyn_smem;
inline Barrier g_block_bar;
inline Barrier g_warp_bar[32];
inline uint32_t g_warp_slot[32][32];
inline const std::function<void()>* g_body = nullptr;
inline long g_yields = 0;
// Scheduling: 0 = round robin (every thread advances in turn); 1 = greedy with a random
// priority order per block (the highest-priority runnable thread runs as far as it can, so
// warps drift far apart: exposes shared-memory reuse races). Seeded by g_sched_seed.
inline int g_sched_mode = 1;
inline unsigned g_sched_seed = 1;
constexpr size_t kStack = 256 * 1024;
constexpr long kMaxYields = 2000000000L;

inline void yield() {
  if (++g_yields > kMaxYields) {
    std::fprintf(stderr, "cdk_emu: deadlock (a barrier or warp collective never completes)\n");
    std::abort();
  }
  swapcontext(&g_cur->ctx, &g_sched);
}

inline void arrive(Barrier& b, int expected) {
  const unsigned my = b.gen;
  if (++b.count == expected) {
    b.count = 0;
    ++b.gen;
  } else {
    g_cur->wait_bar = &b;
    g_cur->wait_gen = my;
    while (b.gen == my) yield();
    g_cur->wait_bar = nullptr;
  }
}

inline void trampoline() {
  (*g_body)();
  g_cur->done = true;
}  // returns to g_sched through uc_link

inline void launch(unsigned grid, unsigned block, size_t dyn_smem,
                   const std::function<void()>& body) {
  if (block == 0 || block > 1024 || block % 32 != 0)
    throw std::invalid_argument("cdk_emu: block size must be a multiple of 32 in [32, 1024]");
  g_grid_dim = dim3(grid);
  g_block_dim = dim3(block);
  g_body = &body;
  for (unsigned b = 0; b < grid; ++b) {
    g_block_idx = make_uint3(b, 0, 0);
    // fill dynamic shared memory with garbage, so a missing initialisation shows
    g_dyn_smem.assign(dyn_smem / sizeof(float) + 1, 12345.678f);
    g_block_bar = Barrier{};
    for (auto& w : g_warp_bar) w = Barrier{};
    std::vector<Thread> th(block);
    for (unsigned t = 0; t < block; ++t) {
      th[t].tid = make_uint3(t, 0, 0);
      th[t].stack.reset(new char[kStack]);
      getcontext(&th[t].ctx);
      th[t].ctx.uc_stack.ss_sp = th[t].stack.get();
      th[t].ctx.uc_stack.ss_size = kStack;
      th[t].ctx.uc_link = &g_sched;
      makecontext(&th[t].ctx, trampoline, 0);
    }
    if (g_sched_mode == 0) {
      for (;;) {
        bool any = false;
        for (unsigned t = 0; t < block; ++t) {
          if (th[t].done) continue;
          any = true;
          g_cur = &th[t];
          swapcontext(&g_sched, &th[t].ctx);
        }
        if (!any) break;
      }
    } else {
      std::vector<unsigned> order(block);
      for (unsigned t = 0; t < block; ++t) order[t] = t;
      for (unsigned t = block - 1; t > 0; --t) {  // Fisher-Yates with an LCG
        g_sched_seed = g_sched_seed * 1664525u + 1013904223u;
        std::swap(order[t], order[(g_sched_seed >> 8) % (t + 1)]);
      }
      for (;;) {
        Thread* next = nullptr;
        bool any = false;
        for (unsigned t : order) {
          Thread& c = th[t];
          if (c.done) continue;
          any = true;
          if (c.wait_bar == nullptr || c.wait_bar->gen != c.wait_gen) { next = &c; break; }
        }
        if (!any) break;
        if (next == nullptr) {
          std::fprintf(stderr, "cdk_emu: deadlock: every live thread waits at a barrier\n");
          std::abort();
        }
        g_cur = next;
        swapcontext(&g_sched, &next->ctx);
      }
    }
    g_cur = nullptr;
  }
}

template <typename T>
inline T warp_exchange(T v, int src_lane) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  const unsigned lane = g_cur->tid.x & 31, warp = g_cur->tid.x >> 5;
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  g_warp_slot[warp][lane] = bits;
  arrive(g_warp_bar[warp], 32);
  bits = g_warp_slot[warp][src_lane & 31];
  arrive(g_warp_bar[warp], 32);
  T r;
  std::memcpy(&r, &bits, 4);
  return r;
}

}  // namespace cdk_emu

// -- CUDA language surface, host versions ---------------------------------------------------------
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __shared__ static
#define __launch_bounds__(...)

#define threadIdx (::cdk_emu::g_cur->tid)
#define blockIdx (::cdk_emu::g_block_idx)
#define blockDim (::cdk_emu::g_block_dim)
#define gridDim (::cdk_emu::g_grid_dim)

template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldg(const T* p) { return *p; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline void __syncthreads() { ::cdk_emu::arrive(::cdk_emu::g_block_bar, (int)::cdk_emu::g_block_dim.x); }
inline float __shfl_xor_sync(unsigned, float v, int m) {
  return ::cdk_emu::warp_exchange(v, (int)(threadIdx.x & 31) ^ m);
}
inline float __shfl_sync(unsigned, float v, int src) { return ::cdk_emu::warp_exchange(v, src); }
inline unsigned __shfl_sync(unsigned, unsigned v, int src) { return ::cdk_emu::warp_exchange(v, src); }
inline int __all_sync(unsigned, int pred) {
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  ::cdk_emu::g_warp_slot[warp][lane] = pred ? 1u : 0u;
  ::cdk_emu::arrive(::cdk_emu::g_warp_bar[warp], 32);
  int all = 1;
  for (int l = 0; l < 32; ++l) all &= (int)::cdk_emu::g_warp_slot[warp][l];
  ::cdk_emu::arrive(::cdk_emu::g_warp_bar[warp], 32);
  return all;
}
inline float atomicAdd(float* p, float v) { const float old = *p; *p = old + v; return old; }
using std::isnan;

namespace cdk_cuda {
inline float* dyn_smem_f32() { return ::cdk_emu::g_dyn_smem.data(); }
}  // namespace cdk_cuda
