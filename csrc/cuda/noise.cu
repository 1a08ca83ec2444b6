// noise.cu -- fills with the raw noise stream: Philox words, uniforms, normals (docs/noise.md).
// One thread item per Philox block = 4 consecutive stream elements (8 for normals of 16-bit
// dtype: the 16-bit stream); grid-stride, 64-bit indices.
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

// The normals of Philox block `block` of a stream for data of type T: the float32 stream
// (4 per block, docs/noise.md section 3) for float32, the 16-bit stream (8 per block, section
// 3b) for 16-bit data, as float32 values (the store rounds them to T, nearest even).
template <typename T> struct BlockNormals;
template <> struct BlockNormals<float> {
  static constexpr int NPB = 4;
  __device__ __forceinline__ static void get(const cdk::PhiloxKeys& K, uint64_t block,
                                             uint32_t sample, float v[4]) {
    const cdk::Normals4 z = cdk::keyed_normals(K, block, sample);
    v[0] = z.n0; v[1] = z.n1; v[2] = z.n2; v[3] = z.n3;
  }
};
template <typename T> struct BlockNormals16 {
  static constexpr int NPB = 8;
  __device__ __forceinline__ static void get(const cdk::PhiloxKeys& K, uint64_t block,
                                             uint32_t sample, float v[8]) {
    const cdk::Normals8 z = cdk::keyed_normals16(K, block, sample);
#pragma unroll
    for (int l = 0; l < 8; ++l) v[l] = z.n[l];
  }
};
template <> struct BlockNormals<__half> : BlockNormals16<__half> {};
template <> struct BlockNormals<__nv_bfloat16> : BlockNormals16<__nv_bfloat16> {};

// Stream elements of a normal() output of type T per thread item: one Philox block, which is
// also one 16-byte vector of T (4 fp32, 8 16-bit elements).
template <typename T> constexpr int kNormalPerItem = BlockNormals<T>::NPB;

// Full 16-byte vectors (one Philox block each) in the steady loop, then the rest one Philox
// block at a time, bounds-checked (as cd_step.cu).
template <typename T>
__global__ void __launch_bounds__(kThreads)
normal_kernel(T* __restrict__ out, uint64_t n, const int64_t* __restrict__ seed_ptr,
              uint64_t offset, uint32_t sample, bool vec) {
  constexpr int L = 4 * kBPI<T>, NPB = BlockNormals<T>::NPB;
  static_assert(NPB == L, "one Philox block per 16-byte vector");
  const cdk::PhiloxKeys K = cdk::philox_keys((uint64_t)__ldg(seed_ptr));
  const uint64_t nblk = (n + NPB - 1) / NPB;
  const uint64_t nsup = vec ? n / L : 0;
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  const uint64_t t0 = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
#pragma unroll 1
  for (uint64_t s = t0; s < nsup; s += stride) {
    float v[L];
    BlockNormals<T>::get(K, offset + s, sample, v);
    Vec16<T>::store(out + s * L, v);
  }
  for (uint64_t i = nsup + t0; i < nblk; i += stride) {
    float v[NPB];
    BlockNormals<T>::get(K, offset + i, sample, v);
#pragma unroll
    for (int k = 0; k < NPB; k += 4) store_block(out, NPB * i + k, n, false, v + k);
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
  CDK_DISPATCH_DTYPE(dtype, T, {
    const uint64_t items = ((uint64_t)n + kNormalPerItem<T> - 1) / kNormalPerItem<T>;
    const unsigned grid = grid_for(normal_kernel<T>, kThreads, items);
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
