// noise.cu -- fills with the raw noise stream: Philox words, uniforms, normals (docs/noise.md).
// One thread per Philox block = 4 consecutive stream elements; grid-stride, 64-bit indices.
#include "common.cuh"

namespace cdk_cuda {
namespace {

__global__ void __launch_bounds__(kThreads)
philox_words_kernel(int32_t* __restrict__ out, uint64_t n, const int64_t* __restrict__ seed_ptr,
                    uint64_t offset, uint32_t sample, bool vec) {
  const cdk::PhiloxKeys K = cdk::philox_keys((uint64_t)__ldg(seed_ptr));
  const uint64_t nblk = (n + 3) / 4;
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < nblk; i += stride) {
    const cdk::Words4 w = cdk::keyed_words(K, offset + i, sample);
    const uint64_t e = 4 * i;
    if (vec && n - e >= 4) {
      *reinterpret_cast<int4*>(out + e) =
          make_int4((int32_t)w.w0, (int32_t)w.w1, (int32_t)w.w2, (int32_t)w.w3);
    } else {
      const uint32_t ws[4] = {w.w0, w.w1, w.w2, w.w3};
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (e + j < n) out[e + j] = (int32_t)ws[j];
    }
  }
}

__global__ void __launch_bounds__(kThreads)
uniform_kernel(float* __restrict__ out, uint64_t n, const int64_t* __restrict__ seed_ptr,
               uint64_t offset, uint32_t sample, bool vec) {
  const cdk::PhiloxKeys K = cdk::philox_keys((uint64_t)__ldg(seed_ptr));
  const uint64_t nblk = (n + 3) / 4;
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < nblk; i += stride) {
    const cdk::Words4 w = cdk::keyed_words(K, offset + i, sample);
    const float v[4] = {cdk::word_to_uniform(w.w0), cdk::word_to_uniform(w.w1),
                        cdk::word_to_uniform(w.w2), cdk::word_to_uniform(w.w3)};
    store_block(out, 4 * i, n, vec, v);
  }
}

// Full 16-byte groups of 4*BPI elements (BPI = 1 for fp32, 2 Philox blocks for 16-bit data) in
// the steady loop, then the rest bounds-checked (as cd_step.cu).
template <typename T>
__global__ void __launch_bounds__(kThreads)
normal_kernel(T* __restrict__ out, uint64_t n, const int64_t* __restrict__ seed_ptr,
              uint64_t offset, uint32_t sample, bool vec) {
  constexpr int BPI = kBPI<T>, L = 4 * BPI;
  const cdk::PhiloxKeys K = cdk::philox_keys((uint64_t)__ldg(seed_ptr));
  const uint64_t nblk = (n + 3) / 4;
  const uint64_t nsup = vec ? n / L : 0;
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  const uint64_t t0 = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
#pragma unroll 1
  for (uint64_t s = t0; s < nsup; s += stride) {
    float v[L];
#pragma unroll
    for (int b = 0; b < BPI; ++b) {
      const cdk::Normals4 z = cdk::keyed_normals(K, offset + s * BPI + b, sample);
      v[4 * b] = z.n0; v[4 * b + 1] = z.n1; v[4 * b + 2] = z.n2; v[4 * b + 3] = z.n3;
    }
    Vec16<T>::store(out + s * L, v);
  }
  for (uint64_t i = nsup * BPI + t0; i < nblk; i += stride) {
    const cdk::Normals4 z = cdk::keyed_normals(K, offset + i, sample);
    const float v[4] = {z.n0, z.n1, z.n2, z.n3};
    store_block(out, 4 * i, n, false, v);
  }
}

#ifndef CDK_EMULATE  // host launchers (a host-only emulation build compiles the kernels alone)
}  // namespace

void philox_words(int device, uintptr_t stream, uintptr_t out, int64_t n, uintptr_t seed,
                  uint64_t offset, uint32_t sample) {
  if (n <= 0) return;
  DeviceGuard guard(device);
  const uint64_t nblk = ((uint64_t)n + 3) / 4;
  const unsigned grid = grid_for(philox_words_kernel, kThreads, nblk);
  philox_words_kernel<<<grid, kThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<int32_t*>(out), (uint64_t)n, reinterpret_cast<const int64_t*>(seed),
      offset, sample, aligned_to(out, 16));
  check_launch("philox_words_kernel");
}

void uniform(int device, uintptr_t stream, uintptr_t out, int64_t n, uintptr_t seed,
             uint64_t offset, uint32_t sample) {
  if (n <= 0) return;
  DeviceGuard guard(device);
  const uint64_t nblk = ((uint64_t)n + 3) / 4;
  const unsigned grid = grid_for(uniform_kernel, kThreads, nblk);
  uniform_kernel<<<grid, kThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<float*>(out), (uint64_t)n, reinterpret_cast<const int64_t*>(seed), offset,
      sample, aligned_to(out, 16));
  check_launch("uniform_kernel");
}

void normal(int device, uintptr_t stream, int dtype, uintptr_t out, int64_t n, uintptr_t seed,
            uint64_t offset, uint32_t sample) {
  check_dtype(dtype, "normal");
  if (n <= 0) return;
  DeviceGuard guard(device);
  const uint64_t nblk = ((uint64_t)n + 3) / 4;
  CDK_DISPATCH_DTYPE(dtype, T, {
    const unsigned grid = grid_for(normal_kernel<T>, kThreads, nblk);
    normal_kernel<T><<<grid, kThreads, 0, as_stream(stream)>>>(
        reinterpret_cast<T*>(out), (uint64_t)n, reinterpret_cast<const int64_t*>(seed), offset,
        sample, aligned_to(out, 16));
    check_launch("normal_kernel");
  });
}

#else
}  // namespace
#endif  // CDK_EMULATE

}  // namespace cdk_cuda
