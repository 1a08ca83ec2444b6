// emulate_driver.cuh -- C-ABI entry points that run the real kernels under the host emulator
// (emulate.cuh), mirroring the host launchers' argument handling, with a caller-chosen grid cap
// so grid-stride loops iterate. Test-only; setup.py never compiles it. Build:
//   g++ -std=c++17 -O2 -fPIC -shared -ffp-contract=off -DCDK_EMULATE -x c++
//       -Icsrc -Icsrc/cuda -I$CUDA_HOME/include csrc/cuda/emulate_driver.cuh -o libcdk_emu.so
// then call emu_* through ctypes on CPU tensors and compare with ReferenceBackend.
// tests/test_cuda_emulated.py does exactly that (at -O1, the fastest overall); keep the emu_*
// signatures in sync with the argtypes there.
#include "emulate.cuh"
#include "noise.cu"
#include "cd_step.cu"
#include "cd_smooth.cu"
#include "ensemble.cu"

using namespace cdk_cuda;
using cdk_emu::launch;

static unsigned cap_grid(uint64_t work, int threads, unsigned cap) {
  uint64_t g = (work + threads - 1) / threads; if (g > cap) g = cap; if (g < 1) g = 1; return (unsigned)g;
}
// The emulator's side of the shared dispatchers: the grid is capped at `cap` blocks (so loops
// iterate); a grid multiple the dispatcher asks for is honoured when it fits under 2*cap, so
// both the fixed-channel and the per-iteration channel paths run.
struct EmuLauncher {
  unsigned cap;
  template <typename Kernel>
  unsigned grid(Kernel*, uint64_t work, size_t, uint64_t multiple) const {
    unsigned g = cap_grid(work, kThreads, cap);
    if (multiple > 1 && multiple <= 2 * (uint64_t)cap && g >= cap) g = (unsigned)multiple;
    return g;
  }
  template <typename Kernel, typename... Args>
  void launch(Kernel* kernel, unsigned grid, size_t smem, Args... args) const {
    cdk_emu::launch(grid, kThreads, smem, [&] { kernel(args...); });
  }
};
#define DT(code, T, ...) switch (code) { case 0: { using T = float; __VA_ARGS__; } break; \
  case 1: { using T = __half; __VA_ARGS__; } break; case 2: { using T = __nv_bfloat16; __VA_ARGS__; } break; }

extern "C" {
void emu_philox_words(int32_t* out, int64_t n, const int64_t* seed, uint64_t off, uint32_t sample, unsigned cap) {
  uint64_t nblk = (n + 3) / 4;
  launch(cap_grid(nblk, kThreads, cap), kThreads, 0, [&] { philox_words_kernel(out, n, seed, off, sample, ((uintptr_t)out) % 16 == 0); });
}
void emu_uniform(float* out, int64_t n, const int64_t* seed, uint64_t off, uint32_t sample, unsigned cap) {
  uint64_t nblk = (n + 3) / 4;
  launch(cap_grid(nblk, kThreads, cap), kThreads, 0, [&] { uniform_kernel(out, n, seed, off, sample, ((uintptr_t)out) % 16 == 0); });
}
void emu_normal(int dtype, void* out, int64_t n, const int64_t* seed, uint64_t off, uint32_t sample, unsigned cap) {
  DT(dtype, T, const uint64_t nblk = (n + kNormalPerItem<T> - 1) / kNormalPerItem<T>;
     launch(cap_grid(nblk, kThreads, cap), kThreads, 0, [&] { normal_kernel<T>((T*)out, n, seed, off, sample, ((uintptr_t)out) % 16 == 0); }));
}
void emu_cd_step_fwd(int dtype, int64_t n, uintptr_t x, uintptr_t f, uintptr_t y, double dt, uintptr_t sigma,
                     double sigma_value, int64_t C, int64_t cs, const int64_t* seed, uint64_t off, int act,
                     unsigned cap, int idx64) {
  cs = std::min(cs, n);
  EmuLauncher Lr{cap};
  step_fwd_dispatch(Lr, idx64 != 0, dtype, n, x, f, y, dt, sigma, sigma_value, C, cs, (uintptr_t)seed, off, act);
}
void emu_cd_step_bwd(int dtype, int64_t n, uintptr_t gy, uintptr_t y, uintptr_t gx, uintptr_t gf, uintptr_t gs,
                     double dt, int64_t C, int64_t cs, const int64_t* seed, uint64_t off, int act, unsigned cap, int idx64) {
  if (n <= 0 || (gx == 0 && gf == 0 && gs == 0)) return;
  cs = std::min(cs, n);
  EmuLauncher Lr{cap};
  step_bwd_dispatch(Lr, idx64 != 0, dtype, n, gy, y, gx, gf, gs, dt, C, cs, (uintptr_t)seed, off, act);
}
void emu_cd_smooth_fwd(int dtype, int64_t n, uintptr_t x, uintptr_t y, uintptr_t sigma, double sv, int64_t C, int64_t cs,
                       int64_t K, const int64_t* seed, uint64_t off, int act, unsigned cap) {
  cs = std::min(cs, n);
  uint64_t nblk = (n + 3) / 4;
  DT(dtype, T, {
    const size_t a = 4 * sizeof(T);
    const bool vec = x % a == 0 && y % a == 0;
    CDK_DISPATCH_ACT(act, A, {
      launch(cap_grid(nblk, kThreads, cap), kThreads, 0, [&] {
        cd_smooth_fwd_kernel<T, A>((const T*)x, (T*)y, n, (const float*)sigma, (float)sv, cs, (uint32_t)C, (uint32_t)K, seed, off, vec); });
    });
  });
}
void emu_cd_smooth_bwd(int dtype, int64_t n, uintptr_t gy, uintptr_t x, uintptr_t gx, uintptr_t gs, uintptr_t sigma, double sv,
                       int64_t C, int64_t cs, int64_t K, const int64_t* seed, uint64_t off, int act, unsigned cap) {
  cs = std::min(cs, n);
  uint64_t nblk = (n + 3) / 4;
  const int red = choose_red_mode(gs != 0, C);
  const size_t smem = red == kRedSmem ? C * 4 : 0;
  DT(dtype, T, {
    const size_t a = 4 * sizeof(T);
    const bool vec = gy % a == 0 && x % a == 0 && gx % a == 0;
    CDK_DISPATCH_ACT(act, A, {
      launch(cap_grid(nblk, kThreads, cap), kThreads, smem, [&] {
        cd_smooth_bwd_kernel<T, A>((const T*)gy, (const T*)x, (T*)gx, (float*)gs, red, n, (const float*)sigma, (float)sv, cs,
                                   (uint32_t)C, (uint32_t)K, seed, off, vec); });
    });
  });
}
}  // extern "C"
template <typename T, bool LOGP> struct EFwd {
  const T* inp; T* out; int64_t K, B, C; float logK; unsigned cap;
  template <int G, int VPT, int BLOCK> void run() {
    unsigned g = (unsigned)std::min<int64_t>((B + BLOCK / G - 1) / (BLOCK / G), cap);
    launch(g, BLOCK, 0, [&] { ens_fwd_rows_kernel<T, LOGP, G, VPT, BLOCK>(inp, out, K, B, C, logK); });
  }
};
template <typename T, bool LOGP> struct EBwd {
  const T *gout, *inp, *out; T* gin; int64_t K, B, C; float logK; unsigned cap;
  template <int G, int VPT, int BLOCK> void run() {
    unsigned g = (unsigned)std::min<int64_t>((B + BLOCK / G - 1) / (BLOCK / G), cap);
    launch(g, BLOCK, 0, [&] { ens_bwd_rows_kernel<T, LOGP, G, VPT, BLOCK>(gout, inp, out, gin, K, B, C, logK, 1.0f / (float)K); });
  }
};
extern "C" {
void emu_ensemble_fwd(int dtype, uintptr_t inp, uintptr_t out, int64_t K, int64_t B, int64_t C, int space, unsigned cap) {
  const float logK = (float)std::log((double)K);
  DT(dtype, T, {
    if (space == 1) {
      launch(cap_grid(B * C, kThreads, cap), kThreads, 0, [&] { ens_fwd_logit_kernel<T>((const T*)inp, (T*)out, K, B * C); });
    } else if (C <= kMaxRowsC) {
      if (space == 0) dispatch_rows(C, EFwd<T, false>{(const T*)inp, (T*)out, K, B, C, logK, cap});
      else dispatch_rows(C, EFwd<T, true>{(const T*)inp, (T*)out, K, B, C, logK, cap});
    } else {
      unsigned g = (unsigned)std::min<int64_t>(B, cap);
      if (space == 0) launch(g, kBigThreads, K * 4, [&] { ens_fwd_big_kernel<T, false>((const T*)inp, (T*)out, K, B, C, logK); });
      else launch(g, kBigThreads, K * 4, [&] { ens_fwd_big_kernel<T, true>((const T*)inp, (T*)out, K, B, C, logK); });
    }
  });
}
void emu_ensemble_bwd(int dtype, uintptr_t gout, uintptr_t inp, uintptr_t out, uintptr_t gin, int64_t K, int64_t B, int64_t C,
                      int space, unsigned cap) {
  const float logK = (float)std::log((double)K);
  DT(dtype, T, {
    if (space == 1) {
      launch(cap_grid(B * C, kThreads, cap), kThreads, 0, [&] { ens_bwd_logit_kernel<T>((const T*)gout, (T*)gin, K, B * C); });
    } else if (C <= kMaxRowsC) {
      if (space == 0) dispatch_rows(C, EBwd<T, false>{(const T*)gout, (const T*)inp, (const T*)out, (T*)gin, K, B, C, logK, cap});
      else dispatch_rows(C, EBwd<T, true>{(const T*)gout, (const T*)inp, (const T*)out, (T*)gin, K, B, C, logK, cap});
    } else {
      unsigned g = (unsigned)std::min<int64_t>(B, cap);
      if (space == 0) launch(g, kBigThreads, K * 8, [&] { ens_bwd_big_kernel<T, false>((const T*)gout, (const T*)inp, (const T*)out, (T*)gin, K, B, C, logK, 1.0f / (float)K); });
      else launch(g, kBigThreads, K * 8, [&] { ens_bwd_big_kernel<T, true>((const T*)gout, (const T*)inp, (const T*)out, (T*)gin, K, B, C, logK, 1.0f / (float)K); });
    }
  });
}
}  // extern "C"
extern "C" void emu_set_sched(int mode, unsigned seed) { cdk_emu::g_sched_mode = mode; cdk_emu::g_sched_seed = seed; }
