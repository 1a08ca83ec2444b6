// std_step.cu -- CUDA kernels of the std-scaled step (cdkernels/std_step.py): the moments of
// z = x + dt*f and the gradient through std(z). The noisy write itself is the cd_step kernel.
//
// Dtype load/store, the device guard, launch checks and dtype dispatch come from common.cuh.
//
// z_stats: pass 1, a grid-stride loop; every thread sums (z - k) and (z - k)^2 in double, with
// the shift k = z[0] (no cancellation when |mean| >> std), then a block tree reduction in
// shared memory writes one (s1, s2) pair per block to `part`. Pass 2, one block, reduces the
// pairs in a fixed order and writes out = (mean, std). Deterministic: no atomics.
// z_std_bwd: grad_x = grad_y + a*(z - mean) + b, grad_f = dt*grad_x, (mean, a, b) read from
// device memory (float64 [3]) so nothing is synchronised with the host.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include <stdexcept>
#include <string>

#include "common.cuh"
#include "cuda_api.h"

namespace cdk_cuda {
namespace stdstep {

constexpr int kStdThreads = 256;
constexpr int kStdMaxBlocks = 1024;  // partial sums buffer: 2 * kStdMaxBlocks doubles

// z = x + dt*f, rounded as the CPU/reference do (no contraction into an FMA)
__device__ __forceinline__ float z_of(float x, float f, float dt) {
  return __fadd_rn(x, __fmul_rn(dt, f));
}

// Tree-sums (s1, s2) over the block (kStdThreads threads) into s1s[0], s2s[0], in a fixed
// order, so the result is deterministic.
__device__ __forceinline__ void block_sum2(double s1, double s2, double* s1s, double* s2s) {
  s1s[threadIdx.x] = s1;
  s2s[threadIdx.x] = s2;
  __syncthreads();
  for (int h = kStdThreads / 2; h > 0; h >>= 1) {
    if ((int)threadIdx.x < h) {
      s1s[threadIdx.x] += s1s[threadIdx.x + h];
      s2s[threadIdx.x] += s2s[threadIdx.x + h];
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void z_moments_kernel(const T* __restrict__ x, const T* __restrict__ f, int64_t n,
                                 float dt, double* __restrict__ part) {
  __shared__ double s1s[kStdThreads], s2s[kStdThreads];
  const float k = z_of(to_f(x[0]), to_f(f[0]), dt);
  double s1 = 0.0, s2 = 0.0;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const double d = (double)__fsub_rn(z_of(to_f(x[i]), to_f(f[i]), dt), k);
    s1 += d;
    s2 += d * d;
  }
  block_sum2(s1, s2, s1s, s2s);
  if (threadIdx.x == 0) {
    part[2 * blockIdx.x] = s1s[0];
    part[2 * blockIdx.x + 1] = s2s[0];
  }
}

template <typename T>
__global__ void z_finish_kernel(const T* __restrict__ x, const T* __restrict__ f, int64_t n,
                                float dt, const double* __restrict__ part, int nparts,
                                double* __restrict__ out) {
  __shared__ double s1s[kStdThreads], s2s[kStdThreads];
  double s1 = 0.0, s2 = 0.0;
  for (int i = threadIdx.x; i < nparts; i += blockDim.x) {
    s1 += part[2 * i];
    s2 += part[2 * i + 1];
  }
  block_sum2(s1, s2, s1s, s2s);
  if (threadIdx.x == 0) {
    const double nd = (double)n;
    const double k = (double)z_of(to_f(x[0]), to_f(f[0]), dt);
    double var = (s2s[0] - s1s[0] * s1s[0] / nd) / (nd - 1.0);
    if (var < 0.0) var = 0.0;
    out[0] = k + s1s[0] / nd;
    out[1] = n > 1 ? sqrt(var) : ::nan("");
  }
}

template <typename T>
__global__ void z_std_bwd_kernel(const T* __restrict__ x, const T* __restrict__ f,
                                 const T* __restrict__ gy, T* __restrict__ gx,
                                 T* __restrict__ gf, int64_t n, float dt,
                                 const double* __restrict__ coefs) {
  const float m = (float)coefs[0], a = (float)coefs[1], b = (float)coefs[2];
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float z = z_of(to_f(x[i]), to_f(f[i]), dt);
    float g = __fadd_rn(__fmul_rn(a, __fsub_rn(z, m)), b);
    if (gy) g = __fadd_rn(to_f(gy[i]), g);
    gx[i] = from_f<T>(g);
    if (gf) gf[i] = from_f<T>(__fmul_rn(dt, g));
  }
}

inline int blocks_for(int64_t n, int cap) {
  int64_t b = (n + kStdThreads - 1) / kStdThreads;
  if (b > cap) b = cap;
  return b < 1 ? 1 : (int)b;
}

}  // namespace stdstep

#ifndef CDK_EMULATE
int z_stats_workspace_doubles() { return 2 * stdstep::kStdMaxBlocks; }

void z_stats(int device, uintptr_t stream, int dtype, int64_t n, uintptr_t x, uintptr_t f,
             double dt, uintptr_t workspace, uintptr_t out) {
  using namespace stdstep;
  check_dtype(dtype, "z_stats");
  if (n <= 0) throw std::invalid_argument("cdkernels CUDA z_stats: n must be > 0");
  DeviceGuard guard(device);
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const int blocks = blocks_for(n, kStdMaxBlocks);
  CDK_DISPATCH_DTYPE(dtype, T, {
    z_moments_kernel<T><<<blocks, kStdThreads, 0, st>>>(
        reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(f), n, (float)dt,
        reinterpret_cast<double*>(workspace));
    check_launch("z_moments_kernel");
    z_finish_kernel<T><<<1, kStdThreads, 0, st>>>(
        reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(f), n, (float)dt,
        reinterpret_cast<const double*>(workspace), blocks, reinterpret_cast<double*>(out));
    check_launch("z_finish_kernel");
  });
}

void z_std_bwd(int device, uintptr_t stream, int dtype, int64_t n, uintptr_t x, uintptr_t f,
               uintptr_t grad_y, uintptr_t grad_x, uintptr_t grad_f, double dt,
               uintptr_t coefs) {
  using namespace stdstep;
  check_dtype(dtype, "z_std_bwd");
  if (n <= 0) return;
  DeviceGuard guard(device);
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const int blocks = blocks_for(n, 8 * kStdMaxBlocks);
  CDK_DISPATCH_DTYPE(dtype, T, {
    z_std_bwd_kernel<T><<<blocks, kStdThreads, 0, st>>>(
        reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(f),
        reinterpret_cast<const T*>(grad_y), reinterpret_cast<T*>(grad_x),
        reinterpret_cast<T*>(grad_f), n, (float)dt, reinterpret_cast<const double*>(coefs));
    check_launch("z_std_bwd_kernel");
  });
}
#endif  // CDK_EMULATE

}  // namespace cdk_cuda
