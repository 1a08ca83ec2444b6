// cd_smooth.cu -- Monte-Carlo smoothing of an activation with in-kernel noise.
//   fwd: y = (1/K) sum_k act(x + s*eps_k)
//   bwd: grad_x = g * (1/K) sum_k act'(z_k);  grad_sigma[c] += sum g * (1/K) sum_k act'(z_k)*eps_k
// eps_k is the stream (seed, offset, sample=k), its normals made with fast transcendentals
// (fast_noise.cuh, docs/noise.md 3c: within 2^-18 r of the accurate ones).
// One thread per Philox block (4 elements); the K
// samples are looped inside the thread (one Philox call per sample per block), so memory does
// not grow with K. Rounding order follows the reference: z = x + s*eps (no FMA contraction),
// y = acc / K, grad_x = (g * dx) / K, grad_sigma term = (g * ds) / K.
// The kernels are compute bound for K > 1, so they use 64-bit indices throughout and choose the
// sigma/reduction variants with uniform runtime branches instead of more template instances.
#include "activations.cuh"
#include "common.cuh"
#include "fast_noise.cuh"

namespace cdk_cuda {
namespace {

// Per-element noise scale of elements e..e+3: sigma[c] (per channel) or a constant.
__device__ __forceinline__ void sigma_block(const float* __restrict__ sigma, float s_const,
                                            bool perchan, uint64_t e, uint64_t chan_stride,
                                            uint32_t C, float s[4]) {
  if (perchan) {
    ChanIter<uint64_t> ch(e, chan_stride, C);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      s[j] = __ldg(sigma + ch.c);
      ch.next(chan_stride, C);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) s[j] = s_const;
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
cd_smooth_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, uint64_t n,
                     const float* __restrict__ sigma, float sigma_value, uint64_t chan_stride,
                     uint32_t C, uint32_t K, const int64_t* __restrict__ seed_ptr,
                     uint64_t offset, bool vec) {
  const cdk::PhiloxKeys PK = cdk::philox_keys((uint64_t)__ldg(seed_ptr));
  const bool perchan = sigma != nullptr && C > 1;
  const float s_const = sigma != nullptr ? __ldg(sigma) : sigma_value;
  const float Kf = (float)K;
  const uint64_t nblk = (n + 3) / 4;
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < nblk; i += stride) {
    const uint64_t e = 4 * i;
    float xv[4], s[4];
    load_block_cs(x, e, n, vec, xv);
    sigma_block(sigma, s_const, perchan, e, chan_stride, C, s);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (uint32_t k = 0; k < K; ++k) {
      const cdk::Normals4 nz = cdk::keyed_normals_fast(PK, offset + i, k);
      const float eps[4] = {nz.n0, nz.n1, nz.n2, nz.n3};
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[j] += A::f(__fadd_rn(xv[j], __fmul_rn(s[j], eps[j])));
    }
    float out[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = acc[j] / Kf;
    store_block(y, e, n, vec, out);
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
cd_smooth_bwd_kernel(const T* __restrict__ gy, const T* __restrict__ x, T* __restrict__ gx,
                     float* __restrict__ gsig, int red, uint64_t n,
                     const float* __restrict__ sigma, float sigma_value, uint64_t chan_stride,
                     uint32_t C, uint32_t K, const int64_t* __restrict__ seed_ptr,
                     uint64_t offset, bool vec) {
  float* const sbins = dyn_smem_f32();
  float* bins = (red == kRedSmem) ? sbins : gsig;
  if (red == kRedSmem) {
    for (uint32_t c = threadIdx.x; c < C; c += blockDim.x) sbins[c] = 0.0f;
    __syncthreads();
  }
  const cdk::PhiloxKeys PK = cdk::philox_keys((uint64_t)__ldg(seed_ptr));
  const bool perchan = sigma != nullptr && C > 1;
  const bool need_ds = red != kRedNone;
  const float s_const = sigma != nullptr ? __ldg(sigma) : sigma_value;
  const float Kf = (float)K;
  float acc = 0.0f;  // kRedScalar
  const uint64_t nblk = (n + 3) / 4;
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  // Block-uniform loop (every thread runs the same iterations) so warp collectives are safe.
  for (uint64_t base = (uint64_t)blockIdx.x * blockDim.x; base < nblk; base += stride) {
    const uint64_t i = base + threadIdx.x;
    const bool active = i < nblk;
    const uint64_t e = 4 * i;
    float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // grad_sigma terms
    if (active) {
      float gv[4], xv[4], s[4];
      load_block_cs(gy, e, n, vec, gv);
      load_block_cs(x, e, n, vec, xv);
      sigma_block(sigma, s_const, perchan, e, chan_stride, C, s);
      float dx[4] = {0.0f, 0.0f, 0.0f, 0.0f}, ds[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (uint32_t k = 0; k < K; ++k) {
        const cdk::Normals4 nz = cdk::keyed_normals_fast(PK, offset + i, k);
        const float eps[4] = {nz.n0, nz.n1, nz.n2, nz.n3};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float d = A::d(__fadd_rn(xv[j], __fmul_rn(s[j], eps[j])));
          dx[j] += d;
          if (need_ds) ds[j] += __fmul_rn(d, eps[j]);
        }
      }
      float out[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        out[j] = __fmul_rn(gv[j], dx[j]) / Kf;
        v[j] = __fmul_rn(gv[j], ds[j]) / Kf;  // 0 past n (gv reads 0 there)
      }
      store_block(gx, e, n, vec, out);
    }
    if (red == kRedScalar) {
      acc += (v[0] + v[1]) + (v[2] + v[3]);
    } else if (red >= kRedSmem && base + (threadIdx.x & ~31u) < nblk) {  // warp-uniform
      uint32_t c[4] = {0u, 0u, 0u, 0u};
      if (active) {
        ChanIter<uint64_t> ch(e, chan_stride, C);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          c[j] = ch.c;
          ch.next(chan_stride, C);
        }
      }
      warp_bin_add(bins, c, v, active);
    }
  }
  if (red == kRedScalar) {
    const float s = block_sum_to_thread0(acc);
    if (threadIdx.x == 0) atomicAdd(gsig, s);
  } else if (red == kRedSmem) {
    __syncthreads();
    for (uint32_t c = threadIdx.x; c < C; c += blockDim.x) {
      const float s = sbins[c];
      if (s != 0.0f) atomicAdd(gsig + c, s);
    }
  }
}

#ifndef CDK_EMULATE  // host launchers (a host-only emulation build compiles the kernels alone)
void check_smooth_args(int64_t C, int64_t chan_stride, int64_t samples, const char* op) {
  check_channels(C, chan_stride, op);
  if (samples < 0 || samples > (int64_t)UINT32_MAX)
    throw std::invalid_argument(std::string("cdkernels CUDA ") + op + ": bad samples=" +
                                std::to_string(samples));
}

}  // namespace

void cd_smooth_fwd(int device, uintptr_t stream, int dtype, int64_t n, uintptr_t x, uintptr_t y,
                   uintptr_t sigma, double sigma_value, int64_t C, int64_t chan_stride,
                   int64_t samples, uintptr_t seed, uint64_t offset, int act) {
  check_dtype(dtype, "cd_smooth_fwd");
  check_smooth_args(C, chan_stride, samples, "cd_smooth_fwd");
  if (n <= 0) return;
  chan_stride = std::min(chan_stride, n);
  DeviceGuard guard(device);
  const cudaStream_t st = as_stream(stream);
  const uint64_t nblk = ((uint64_t)n + 3) / 4;
  CDK_DISPATCH_DTYPE(dtype, T, {
    const bool vec = aligned_to(x, 4 * sizeof(T)) && aligned_to(y, 4 * sizeof(T));
    CDK_DISPATCH_ACT(act, A, {
      auto kernel = cd_smooth_fwd_kernel<T, A>;
      const unsigned grid = grid_for(kernel, kThreads, nblk);
      kernel<<<grid, kThreads, 0, st>>>(
          reinterpret_cast<const T*>(x), reinterpret_cast<T*>(y), (uint64_t)n,
          reinterpret_cast<const float*>(sigma), (float)sigma_value, (uint64_t)chan_stride,
          (uint32_t)C, (uint32_t)samples, reinterpret_cast<const int64_t*>(seed), offset, vec);
      check_launch("cd_smooth_fwd_kernel");
    });
  });
}

void cd_smooth_bwd(int device, uintptr_t stream, int dtype, int64_t n, uintptr_t grad_y,
                   uintptr_t x, uintptr_t grad_x, uintptr_t grad_sigma, uintptr_t sigma,
                   double sigma_value, int64_t C, int64_t chan_stride, int64_t samples,
                   uintptr_t seed, uint64_t offset, int act) {
  check_dtype(dtype, "cd_smooth_bwd");
  check_smooth_args(C, chan_stride, samples, "cd_smooth_bwd");
  if (n <= 0) return;
  if (grad_x == 0) throw std::invalid_argument("cdkernels CUDA cd_smooth_bwd: grad_x is required");
  chan_stride = std::min(chan_stride, n);
  DeviceGuard guard(device);
  const cudaStream_t st = as_stream(stream);
  const uint64_t nblk = ((uint64_t)n + 3) / 4;
  const int red = choose_red_mode(grad_sigma != 0, C);
  const size_t smem = red == kRedSmem ? (size_t)C * sizeof(float) : 0;
  CDK_DISPATCH_DTYPE(dtype, T, {
    const size_t a = 4 * sizeof(T);
    const bool vec = aligned_to(grad_y, a) && aligned_to(x, a) && aligned_to(grad_x, a);
    CDK_DISPATCH_ACT(act, A, {
      auto kernel = cd_smooth_bwd_kernel<T, A>;
      const unsigned grid = grid_for(kernel, kThreads, nblk, smem);
      kernel<<<grid, kThreads, smem, st>>>(
          reinterpret_cast<const T*>(grad_y), reinterpret_cast<const T*>(x),
          reinterpret_cast<T*>(grad_x), reinterpret_cast<float*>(grad_sigma), red, (uint64_t)n,
          reinterpret_cast<const float*>(sigma), (float)sigma_value, (uint64_t)chan_stride,
          (uint32_t)C, (uint32_t)samples, reinterpret_cast<const int64_t*>(seed), offset, vec);
      check_launch("cd_smooth_bwd_kernel");
    });
  });
}

#else
}  // namespace
#endif  // CDK_EMULATE

}  // namespace cdk_cuda
