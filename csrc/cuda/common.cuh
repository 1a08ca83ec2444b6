// common.cuh -- shared pieces of the cdkernels CUDA kernels: error checks, device guard, grid
// sizing, dtype load/store (scalar and 4-wide), channel iteration, warp/block reductions.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "../cdk_noise.h"
#include "cuda_api.h"

namespace cdk_cuda {

// ============================== host side ====================================================

// Throws std::runtime_error("cdkernels CUDA: <what>: <cudaGetErrorString>") on error.
void check_cuda(cudaError_t err, const char* what);
// cudaGetLastError() after a launch; throws with the kernel name.
void check_launch(const char* kernel_name);
// Multiprocessor count of the current device (cached per device).
int sm_count();
// Resident-block capacity of the current device for `kernel` (occupancy * SMs), cached.
int grid_capacity(const void* kernel, int threads, size_t dyn_smem);

// Makes `device` current for the scope of the guard and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1, dev_ = -1;
};

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

constexpr int kThreads = 256;  // block size of the elementwise kernels

// Grid for a grid-stride loop over `work` thread-items: enough blocks to cover the work, at most
// what is resident at once (a few blocks per SM; occupancy-derived). Always >= 1.
template <typename Kernel>
inline unsigned grid_for(Kernel* kernel, int threads, uint64_t work, size_t dyn_smem = 0) {
  const uint64_t need = (work + (uint64_t)threads - 1) / (uint64_t)threads;
  const uint64_t cap = (uint64_t)grid_capacity((const void*)kernel, threads, dyn_smem);
  uint64_t g = need < cap ? need : cap;
  if (g < 1) g = 1;
  return (unsigned)g;
}

inline bool aligned_to(uintptr_t p, uintptr_t a) { return (p % a) == 0; }

constexpr int kGridWaves = 4;  // grids of several waves: a busy SM delays 1/4 of the work, not all

#ifndef CDK_EMULATE
// The launcher the shared dispatchers (cd_step.cu, ...) use on a real GPU; the host emulator
// supplies its own with the same two members.
struct CudaLauncher {
  cudaStream_t st;
  const char* name;
  // Grid for `work` thread-items of kThreads-thread blocks: kGridWaves times what is resident,
  // rounded up to a multiple of `multiple`, but never more blocks than the work needs.
  template <typename Kernel>
  unsigned grid(Kernel* kernel, uint64_t work, size_t dyn_smem, uint64_t multiple) const {
    const uint64_t need = (work + kThreads - 1) / kThreads;
    uint64_t g = (uint64_t)grid_capacity((const void*)kernel, kThreads, dyn_smem) * kGridWaves;
    if (multiple > 1) g = (g + multiple - 1) / multiple * multiple;
    g = std::min<uint64_t>(std::min<uint64_t>(g, need), (uint64_t)INT32_MAX);
    return (unsigned)std::max<uint64_t>(g, 1);
  }
  template <typename Kernel, typename... Args>
  void launch(Kernel* kernel, unsigned grid, size_t dyn_smem, Args... args) const {
    kernel<<<grid, kThreads, dyn_smem, st>>>(args...);
    check_launch(name);
  }
};
#endif

// Dispatch helpers. `code` is a DTypeCode / ActCode; the body sees a type alias.
#define CDK_DISPATCH_DTYPE(code, T, ...)                                                     \
  switch (code) {                                                                            \
    case ::cdk_cuda::kFloat32: { using T = float; __VA_ARGS__; } break;                      \
    case ::cdk_cuda::kFloat16: { using T = __half; __VA_ARGS__; } break;                     \
    case ::cdk_cuda::kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__; } break;             \
    default: throw std::invalid_argument("cdkernels CUDA: bad dtype code " +                 \
                                         std::to_string(code));                              \
  }

// ============================== device side ==================================================


// The block's dynamic shared memory (behind a helper so a host emulation can supply it).
#ifndef CDK_EMULATE
__device__ __forceinline__ float* dyn_smem_f32() {
  extern __shared__ float cdk_dyn_smem[];
  return cdk_dyn_smem;
}
#endif
constexpr uint32_t kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// 16-bit payload <-> float, for the packed 4-wide paths.
template <typename T> __device__ __forceinline__ float bits16_to_f(uint32_t b);
template <> __device__ __forceinline__ float bits16_to_f<__half>(uint32_t b) {
  return __half2float(__ushort_as_half((unsigned short)(b & 0xffffu)));
}
template <> __device__ __forceinline__ float bits16_to_f<__nv_bfloat16>(uint32_t b) {
  return __bfloat162float(__ushort_as_bfloat16((unsigned short)(b & 0xffffu)));
}
template <typename T> __device__ __forceinline__ uint32_t f_to_bits16(float v);
template <> __device__ __forceinline__ uint32_t f_to_bits16<__half>(float v) {
  return (uint32_t)__half_as_ushort(__float2half_rn(v));
}
template <> __device__ __forceinline__ uint32_t f_to_bits16<__nv_bfloat16>(float v) {
  return (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// Scalar loads: plain, read-only (__ldg) and streaming (__ldcs, evict-first).
template <typename T> __device__ __forceinline__ float ld(const T* p) { return to_f(*p); }
template <typename T> __device__ __forceinline__ float ld_cs(const T* p) { return to_f(__ldcs(p)); }
template <typename T> __device__ __forceinline__ void st(T* p, float v) { *p = from_f<T>(v); }

// 4 consecutive elements; p must be aligned to 4*sizeof(T) (16 bytes fp32, 8 bytes 16-bit).
template <typename T> struct Pack4;
template <> struct Pack4<float> {
  __device__ __forceinline__ static void load_cs(const float* p, float v[4]) {
    const float4 t = __ldcs(reinterpret_cast<const float4*>(p));
    v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
  }
  __device__ __forceinline__ static void store(float* p, const float v[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
};
template <typename T> struct Pack4_16 {
  __device__ __forceinline__ static void load_cs(const T* p, float v[4]) {
    const uint2 t = __ldcs(reinterpret_cast<const uint2*>(p));
    v[0] = bits16_to_f<T>(t.x); v[1] = bits16_to_f<T>(t.x >> 16);
    v[2] = bits16_to_f<T>(t.y); v[3] = bits16_to_f<T>(t.y >> 16);
  }
  __device__ __forceinline__ static void store(T* p, const float v[4]) {
    uint2 t;
    t.x = f_to_bits16<T>(v[0]) | (f_to_bits16<T>(v[1]) << 16);
    t.y = f_to_bits16<T>(v[2]) | (f_to_bits16<T>(v[3]) << 16);
    *reinterpret_cast<uint2*>(p) = t;
  }
};
template <> struct Pack4<__half> : Pack4_16<__half> {};
template <> struct Pack4<__nv_bfloat16> : Pack4_16<__nv_bfloat16> {};

// Philox blocks per 16-byte vector of T: 1 for fp32, 2 for 16-bit data.
template <typename T> constexpr int kBPI = 16 / (4 * (int)sizeof(T));

// 16-byte loads/stores of 4*BPI elements.
template <typename T> struct Vec16;
template <> struct Vec16<float> {
  __device__ __forceinline__ static void load(const float* p, float v[4]) {
    Pack4<float>::load_cs(p, v);
  }
  __device__ __forceinline__ static void store(float* p, const float v[4]) {
    Pack4<float>::store(p, v);
  }
};
template <typename T> struct Vec16_16 {
  __device__ __forceinline__ static void load(const T* p, float v[8]) {
    const uint4 t = __ldcs(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {t.x, t.y, t.z, t.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[2 * k] = bits16_to_f<T>(w[k]);
      v[2 * k + 1] = bits16_to_f<T>(w[k] >> 16);
    }
  }
  __device__ __forceinline__ static void store(T* p, const float v[8]) {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = f_to_bits16<T>(v[2 * k]) | (f_to_bits16<T>(v[2 * k + 1]) << 16);
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
};
template <> struct Vec16<__half> : Vec16_16<__half> {};
template <> struct Vec16<__nv_bfloat16> : Vec16_16<__nv_bfloat16> {};

// Elements e..e+3 of p (those < n; the others read as 0). `vec`: every pointer of the call is
// 4-element aligned (host-checked, uniform), so a full block may use one wide access.
template <typename T, typename I>
__device__ __forceinline__ void load_block_cs(const T* __restrict__ p, I e, I n, bool vec,
                                              float v[4]) {
  if (vec && n - e >= (I)4) {
    Pack4<T>::load_cs(p + e, v);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = (e + (I)j < n) ? ld_cs(p + e + j) : 0.0f;
  }
}
template <typename T, typename I>
__device__ __forceinline__ void store_block(T* __restrict__ p, I e, I n, bool vec,
                                            const float v[4]) {
  if (vec && n - e >= (I)4) {
    Pack4<T>::store(p + e, v);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (e + (I)j < n) st(p + e + j, v[j]);
  }
}

__device__ __forceinline__ float4 normals_of(const cdk::Normals4& z) {
  return make_float4(z.n0, z.n1, z.n2, z.n3);
}

// Channel of flat position p: c = (p / chan_stride) % C, stepped along consecutive positions
// without further divisions. `r` = p % chan_stride.
template <typename I>
struct ChanIter {
  I r;
  uint32_t c;
  __device__ __forceinline__ ChanIter(I p, I chan_stride, uint32_t C) {
    const I q = p / chan_stride;
    r = p - q * chan_stride;
    c = (uint32_t)(q % (I)C);
  }
  __device__ __forceinline__ void next(I chan_stride, uint32_t C) {
    if (++r == chan_stride) {
      r = 0;
      if (++c == C) c = 0;
    }
  }
};

// -- reductions --------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Sum over the block; the result is valid in thread 0. Every thread of the block must call it.
__device__ __forceinline__ float block_sum_to_thread0(float v) {
  __shared__ float part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = 0.0f;
  if (warp == 0) {
    v = lane < nwarps ? part[lane] : 0.0f;
    v = warp_sum(v);
  }
  return v;
}

// Per-channel accumulation of the four values v[0..3] of channels c[0..3] into bins[]
// (shared or global memory) with atomicAdd. Must be called by all 32 lanes of a warp together
// (warp-uniform control flow); `active` lanes contribute, inactive ones contribute nothing.
// Lane 0 must be active whenever any lane is (true for i = base + lane indexing).
// Fast path: every active lane has all four elements in lane 0's channel (e.g. NCHW layouts):
// one warp reduction and a single atomic. Otherwise each lane adds its runs of equal channels.
__device__ __forceinline__ void warp_bin_add(float* bins, const uint32_t c[4], const float v[4],
                                             bool active) {
  const uint32_t cref = __shfl_sync(kFullMask, c[0], 0);
  const bool uniform = !active || (c[0] == cref && c[1] == cref && c[2] == cref && c[3] == cref);
  if (__all_sync(kFullMask, uniform)) {
    float s = active ? (v[0] + v[1]) + (v[2] + v[3]) : 0.0f;
    s = warp_sum(s);
    if ((threadIdx.x & 31) == 0) atomicAdd(bins + cref, s);
  } else if (active) {
    uint32_t rc = c[0];
    float run = v[0];
#pragma unroll
    for (int j = 1; j < 4; ++j) {
      if (c[j] == rc) {
        run += v[j];
      } else {
        atomicAdd(bins + rc, run);
        rc = c[j];
        run = v[j];
      }
    }
    atomicAdd(bins + rc, run);
  }
}

// How grad_sigma is reduced (chosen on the host from C).
enum RedMode : int {
  kRedNone = 0,    // no grad_sigma
  kRedScalar = 1,  // C == 1: per-thread register sum, block reduction, one atomic per block
  kRedSmem = 2,    // 1 < C <= kMaxSmemBins: per-block shared bins, flushed with atomics
  kRedGlobal = 3,  // larger C: warp-aggregated atomics straight into grad_sigma
};
constexpr int64_t kMaxSmemBins = 4096;  // 16 KiB of shared memory per block

inline int choose_red_mode(bool have_grad_sigma, int64_t C) {
  if (!have_grad_sigma) return kRedNone;
  if (C == 1) return kRedScalar;
  if (C <= kMaxSmemBins) return kRedSmem;
  return kRedGlobal;
}

inline void check_dtype(int dtype, const char* op) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16)
    throw std::invalid_argument(std::string("cdkernels CUDA ") + op + ": bad dtype code " +
                                std::to_string(dtype));
}

// Validation shared by the per-channel launchers.
inline void check_channels(int64_t C, int64_t chan_stride, const char* op) {
  if (C < 1 || C > (int64_t)INT32_MAX || chan_stride < 1)
    throw std::invalid_argument(std::string("cdkernels CUDA ") + op + ": bad C=" +
                                std::to_string(C) + " / chan_stride=" +
                                std::to_string(chan_stride));
}

}  // namespace cdk_cuda
