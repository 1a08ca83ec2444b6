// cd_step.cu -- fused convection-diffusion step with in-kernel noise.
//   fwd: y = act(x + dt*f + s*sqrt(dt)*eps),  act in {none, relu}
//   bwd: gz = g * (y > 0 if relu); grad_x = gz; grad_f = dt*gz; grad_sigma[c] += sum gz*eps
// One thread per Philox block (4 consecutive elements, one Philox call), grid-stride loop.
// Arithmetic follows the reference's rounding order exactly (explicit _rn ops, no FMA
// contraction): z = (x + dt*f) + (s*sqrt(dt))*eps, each product and sum rounded to float32.
// I (index type) is uint32_t when n < 2^31, else uint64_t: channel divisions and loop
// arithmetic stay 32-bit in the common case.
#include "common.cuh"

namespace cdk_cuda {
namespace {

__device__ __forceinline__ float relu_f(float z) { return z < 0.0f ? 0.0f : z; }  // NaN stays NaN

template <typename T, bool RELU, typename I, bool PERCHAN>
__global__ void __launch_bounds__(kThreads)
cd_step_fwd_kernel(const T* __restrict__ x, const T* __restrict__ f, T* __restrict__ y, I n,
                   float dt, float sqrtdt, const float* __restrict__ sigma, float coef_const,
                   I chan_stride, uint32_t C, const int64_t* __restrict__ seed_ptr,
                   uint64_t offset, bool vec) {
  const uint64_t seed = (uint64_t)__ldg(seed_ptr);
  // Non-per-channel noise scale: sigma_value*sqrt(dt) (host, double) or sigma[0]*sqrt(dt).
  float coef_u = coef_const;
  if (!PERCHAN && sigma != nullptr) coef_u = __fmul_rn(__ldg(sigma), sqrtdt);
  const I nblk = (n + 3) / 4;
  const I stride = (I)gridDim.x * (I)blockDim.x;
  for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < nblk; i += stride) {
    const I e = i * 4;
    float xv[4], fv[4];
    load_block_cs(x, e, n, vec, xv);
    load_block_cs(f, e, n, vec, fv);
    const cdk::Normals4 nz = cdk::stream_normals(seed, offset + (uint64_t)i, 0u);
    const float eps[4] = {nz.n0, nz.n1, nz.n2, nz.n3};
    float coef[4];
    if (PERCHAN) {
      ChanIter<I> ch(e, chan_stride, C);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        coef[j] = __fmul_rn(__ldg(sigma + ch.c), sqrtdt);
        ch.next(chan_stride, C);
      }
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) coef[j] = coef_u;
    }
    float out[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float z = __fadd_rn(__fadd_rn(xv[j], __fmul_rn(dt, fv[j])), __fmul_rn(coef[j], eps[j]));
      out[j] = RELU ? relu_f(z) : z;
    }
    store_block(y, e, n, vec, out);
  }
}

template <typename T, bool RELU, typename I, int RED>
__global__ void __launch_bounds__(kThreads)
cd_step_bwd_kernel(const T* __restrict__ gy, const T* __restrict__ y, T* __restrict__ gx,
                   T* __restrict__ gf, float* __restrict__ gsig, I n, float dt, I chan_stride,
                   uint32_t C, const int64_t* __restrict__ seed_ptr, uint64_t offset, bool vec) {
  float* const sbins = dyn_smem_f32();
  float* bins = (RED == kRedSmem) ? sbins : gsig;
  if (RED == kRedSmem) {
    for (uint32_t c = threadIdx.x; c < C; c += blockDim.x) sbins[c] = 0.0f;
    __syncthreads();
  }
  const uint64_t seed = (RED != kRedNone) ? (uint64_t)__ldg(seed_ptr) : 0;
  float acc = 0.0f;  // kRedScalar
  const I nblk = (n + 3) / 4;
  const I stride = (I)gridDim.x * (I)blockDim.x;
  // Block-uniform loop (every thread runs the same iterations) so warp collectives are safe.
  for (I base = (I)blockIdx.x * (I)blockDim.x; base < nblk; base += stride) {
    const I i = base + (I)threadIdx.x;
    const bool active = i < nblk;
    const I e = i * 4;
    float gz[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (active) {
      load_block_cs(gy, e, n, vec, gz);  // elements past n read as 0
      if (RELU) {
        float yv[4];
        load_block_cs(y, e, n, vec, yv);
#pragma unroll
        for (int j = 0; j < 4; ++j) gz[j] = __fmul_rn(gz[j], (yv[j] > 0.0f) ? 1.0f : 0.0f);
      }
      if (gx != nullptr) store_block(gx, e, n, vec, gz);
      if (gf != nullptr) {
        float t[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) t[j] = __fmul_rn(dt, gz[j]);
        store_block(gf, e, n, vec, t);
      }
    }
    if (RED != kRedNone) {
      float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (active) {
        const cdk::Normals4 nz = cdk::stream_normals(seed, offset + (uint64_t)i, 0u);
        v[0] = __fmul_rn(gz[0], nz.n0);
        v[1] = __fmul_rn(gz[1], nz.n1);
        v[2] = __fmul_rn(gz[2], nz.n2);
        v[3] = __fmul_rn(gz[3], nz.n3);
      }
      if (RED == kRedScalar) {
        acc += (v[0] + v[1]) + (v[2] + v[3]);
      } else if (base + (I)(threadIdx.x & ~31u) < nblk) {  // warp-uniform: lane 0 active
        uint32_t c[4] = {0u, 0u, 0u, 0u};
        if (active) {
          ChanIter<I> ch(e, chan_stride, C);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            c[j] = ch.c;
            ch.next(chan_stride, C);
          }
        }
        warp_bin_add(bins, c, v, active);
      }
    }
  }
  if (RED == kRedScalar) {
    const float s = block_sum_to_thread0(acc);
    if (threadIdx.x == 0) atomicAdd(gsig, s);
  } else if (RED == kRedSmem) {
    __syncthreads();
    for (uint32_t c = threadIdx.x; c < C; c += blockDim.x) {
      const float s = sbins[c];
      if (s != 0.0f) atomicAdd(gsig + c, s);
    }
  }
}

#ifndef CDK_EMULATE  // host launchers (a host-only emulation build compiles the kernels alone)
template <typename T, bool RELU, typename I>
void launch_fwd(cudaStream_t st, int64_t n, uintptr_t x, uintptr_t f, uintptr_t y, double dt,
                uintptr_t sigma, double sigma_value, int64_t C, int64_t chan_stride,
                uintptr_t seed, uint64_t offset) {
  const bool vec = aligned_to(x, 4 * sizeof(T)) && aligned_to(f, 4 * sizeof(T)) &&
                   aligned_to(y, 4 * sizeof(T));
  const float dt_f = (float)dt;
  const float sqrtdt_f = (float)std::sqrt(dt);
  const float coef_const = (float)(sigma_value * std::sqrt(dt));
  const uint64_t nblk = ((uint64_t)n + 3) / 4;
  auto run = [&](auto kernel) {
    const unsigned grid = grid_for(kernel, kThreads, nblk);
    kernel<<<grid, kThreads, 0, st>>>(
        reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(f), reinterpret_cast<T*>(y),
        (I)n, dt_f, sqrtdt_f, reinterpret_cast<const float*>(sigma), coef_const, (I)chan_stride,
        (uint32_t)C, reinterpret_cast<const int64_t*>(seed), offset, vec);
    check_launch("cd_step_fwd_kernel");
  };
  if (sigma != 0 && C > 1)
    run(cd_step_fwd_kernel<T, RELU, I, true>);
  else
    run(cd_step_fwd_kernel<T, RELU, I, false>);
}

template <typename T, bool RELU, typename I>
void launch_bwd(cudaStream_t st, int64_t n, uintptr_t gy, uintptr_t y, uintptr_t gx,
                uintptr_t gf, uintptr_t gsig, double dt, int64_t C, int64_t chan_stride,
                uintptr_t seed, uint64_t offset) {
  const size_t a = 4 * sizeof(T);
  const bool vec = aligned_to(gy, a) && aligned_to(y, a) && aligned_to(gx, a) &&
                   aligned_to(gf, a);  // absent pointers (0) are aligned
  const uint64_t nblk = ((uint64_t)n + 3) / 4;
  const int red = choose_red_mode(gsig != 0, C);
  auto run = [&](auto kernel, size_t smem) {
    const unsigned grid = grid_for(kernel, kThreads, nblk, smem);
    kernel<<<grid, kThreads, smem, st>>>(
        reinterpret_cast<const T*>(gy), reinterpret_cast<const T*>(y), reinterpret_cast<T*>(gx),
        reinterpret_cast<T*>(gf), reinterpret_cast<float*>(gsig), (I)n, (float)dt,
        (I)chan_stride, (uint32_t)C, reinterpret_cast<const int64_t*>(seed), offset, vec);
    check_launch("cd_step_bwd_kernel");
  };
  switch (red) {
    case kRedNone: run(cd_step_bwd_kernel<T, RELU, I, kRedNone>, 0); break;
    case kRedScalar: run(cd_step_bwd_kernel<T, RELU, I, kRedScalar>, 0); break;
    case kRedSmem:
      run(cd_step_bwd_kernel<T, RELU, I, kRedSmem>, (size_t)C * sizeof(float));
      break;
    default: run(cd_step_bwd_kernel<T, RELU, I, kRedGlobal>, 0); break;
  }
}

void check_step_act(int act, const char* op) {
  if (act != kActNone && act != kActRelu)
    throw std::invalid_argument(std::string("cdkernels CUDA ") + op +
                                ": act must be none (0) or relu (1), got " +
                                std::to_string(act));
}

}  // namespace

void cd_step_fwd(int device, uintptr_t stream, int dtype, int64_t n, uintptr_t x, uintptr_t f,
                 uintptr_t y, double dt, uintptr_t sigma, double sigma_value, int64_t C,
                 int64_t chan_stride, uintptr_t seed, uint64_t offset, int act) {
  check_dtype(dtype, "cd_step_fwd");
  check_step_act(act, "cd_step_fwd");
  check_channels(C, chan_stride, "cd_step_fwd");
  if (n <= 0) return;
  chan_stride = std::min(chan_stride, n);  // same channels for every p < n; fits I
  DeviceGuard guard(device);
  const cudaStream_t st = as_stream(stream);
  const bool small = n < ((int64_t)1 << 31);
  CDK_DISPATCH_DTYPE(dtype, T, {
    if (act == kActRelu) {
      if (small) launch_fwd<T, true, uint32_t>(st, n, x, f, y, dt, sigma, sigma_value, C, chan_stride, seed, offset);
      else launch_fwd<T, true, uint64_t>(st, n, x, f, y, dt, sigma, sigma_value, C, chan_stride, seed, offset);
    } else {
      if (small) launch_fwd<T, false, uint32_t>(st, n, x, f, y, dt, sigma, sigma_value, C, chan_stride, seed, offset);
      else launch_fwd<T, false, uint64_t>(st, n, x, f, y, dt, sigma, sigma_value, C, chan_stride, seed, offset);
    }
  });
}

void cd_step_bwd(int device, uintptr_t stream, int dtype, int64_t n, uintptr_t grad_y,
                 uintptr_t y, uintptr_t grad_x, uintptr_t grad_f, uintptr_t grad_sigma, double dt,
                 int64_t C, int64_t chan_stride, uintptr_t seed, uint64_t offset, int act) {
  check_dtype(dtype, "cd_step_bwd");
  check_step_act(act, "cd_step_bwd");
  check_channels(C, chan_stride, "cd_step_bwd");
  if (act == kActRelu && y == 0)
    throw std::invalid_argument("cdkernels CUDA cd_step_bwd: relu needs y");
  if (n <= 0 || (grad_x == 0 && grad_f == 0 && grad_sigma == 0)) return;
  chan_stride = std::min(chan_stride, n);  // same channels for every p < n; fits I
  DeviceGuard guard(device);
  const cudaStream_t st = as_stream(stream);
  const bool small = n < ((int64_t)1 << 31);
  CDK_DISPATCH_DTYPE(dtype, T, {
    if (act == kActRelu) {
      if (small) launch_bwd<T, true, uint32_t>(st, n, grad_y, y, grad_x, grad_f, grad_sigma, dt, C, chan_stride, seed, offset);
      else launch_bwd<T, true, uint64_t>(st, n, grad_y, y, grad_x, grad_f, grad_sigma, dt, C, chan_stride, seed, offset);
    } else {
      if (small) launch_bwd<T, false, uint32_t>(st, n, grad_y, y, grad_x, grad_f, grad_sigma, dt, C, chan_stride, seed, offset);
      else launch_bwd<T, false, uint64_t>(st, n, grad_y, y, grad_x, grad_f, grad_sigma, dt, C, chan_stride, seed, offset);
    }
  });
}

#else
}  // namespace
#endif  // CDK_EMULATE

}  // namespace cdk_cuda
