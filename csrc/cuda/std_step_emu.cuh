// std_step_emu.cuh -- C entry points that run the std_step.cu kernels under the host emulator
// (emulate.cuh), like emulate_driver.cuh does for the other kernels. Test-only (setup.py never
// compiles it); tests/test_std_step.py builds it with
//   g++ -std=c++17 -O1 -fPIC -shared -ffp-contract=off -DCDK_EMULATE -x c++ -Icsrc -Icsrc/cuda
//       -I$CUDA_HOME/include csrc/cuda/std_step_emu.cuh -o libcdk_std_emu.so
// The grid is capped by the caller so the grid-stride loops and the two-level reduction iterate.
#include "emulate.cuh"
#include "std_step.cu"

using cdk_emu::launch;
using namespace cdk_cuda::stdstep;

#define STD_DT(code, T, ...) switch (code) { case 0: { using T = float; __VA_ARGS__; } break; \
  case 1: { using T = __half; __VA_ARGS__; } break; default: { using T = __nv_bfloat16; __VA_ARGS__; } break; }

extern "C" {
void emu_set_sched_std(int mode, unsigned seed) { cdk_emu::g_sched_mode = mode; cdk_emu::g_sched_seed = seed; }

void emu_z_stats(int dtype, int64_t n, const void* x, const void* f, double dt, double* part,
                 double* out, unsigned cap) {
  const int blocks = blocks_for(n, (int)cap);
  STD_DT(dtype, T, {
    launch(blocks, kStdThreads, 0, [&] { z_moments_kernel<T>((const T*)x, (const T*)f, n, (float)dt, part); });
    launch(1, kStdThreads, 0, [&] { z_finish_kernel<T>((const T*)x, (const T*)f, n, (float)dt, part, blocks, out); });
  });
}

void emu_z_std_bwd(int dtype, int64_t n, const void* x, const void* f, const void* gy, void* gx,
                   void* gf, double dt, const double* coefs, unsigned cap) {
  const int blocks = blocks_for(n, (int)cap);
  STD_DT(dtype, T, {
    launch(blocks, kStdThreads, 0, [&] { z_std_bwd_kernel<T>((const T*)x, (const T*)f, (const T*)gy, (T*)gx, (T*)gf, n, (float)dt, coefs); });
  });
}
}
