// cd_step.cu -- fused convection-diffusion step with in-kernel noise.
//   fwd: y = act(x + dt*f + s*sqrt(dt)*eps),  act in {none, relu}
//   bwd: gz = g * (y > 0 if relu); grad_x = gz; grad_f = dt*gz; grad_sigma[c] += sum gz*eps
// Arithmetic follows the reference's rounding order exactly (explicit _rn ops, no FMA
// contraction): z = (x + dt*f) + (s*sqrt(dt))*eps, each product and sum rounded to float32.
// I (index type) is uint32_t when n < 2^31, else uint64_t.
//
// Noise: float32 data uses the float32 stream (4 normals per Philox block, docs/noise.md
// section 3); 16-bit data the 16-bit stream (8 normals per block, section 3b), each normal
// rounded to T and used widened back to float32 (`StepNoise<T>`). Either way one Philox block
// covers NPB = L elements: one 16-byte vector of each input.
//
// Loop shape (what bench/sass_budget.py counts): a grid-stride loop over *full 16-byte
// super-blocks* only: L = 16 / sizeof(T) elements per iteration (4 for fp32, 8 for 16-bit data:
// one 128-bit load per input, one Philox call), no bounds checks, no alignment test. What is
// left (the last partial super-block, or everything when a pointer is not 16-byte aligned) runs
// in a second, generic loop after it, one Philox block (NPB elements) at a time, bounds-checked.
//
// Per-channel sigma: the host picks the grid so that one grid-stride step D = L*threads is
// a multiple of the channel period P = C * chan_stride (or the loop runs once per thread); then
// the channels of a thread's elements never change and are computed once, before the loop
// (`fixed_chan`). When that does not hold (the emulator's small grids, P too large for any grid)
// a non-inlined slow path recomputes them per iteration.
#include "common.cuh"

namespace cdk_cuda {
namespace {

__device__ __forceinline__ float relu_f(float z) { return z < 0.0f ? 0.0f : z; }  // NaN stays NaN

// The noise of a step on data of type T: the NPB stream elements of Philox block `block`
// (sample 0), as the float32 values the step computes with.
template <typename T> struct StepNoise;
template <> struct StepNoise<float> {  // float32 stream: 4 per block
  static constexpr int NPB = 4;
  __device__ __forceinline__ static void get(const cdk::PhiloxKeys& K, uint64_t block,
                                             float eps[4]) {
    const cdk::Normals4 nz = cdk::keyed_normals(K, block, 0u);
    eps[0] = nz.n0; eps[1] = nz.n1; eps[2] = nz.n2; eps[3] = nz.n3;
  }
};
template <typename T> struct StepNoise16 {  // 16-bit stream: 8 per block, rounded to T
  static constexpr int NPB = 8;
  __device__ __forceinline__ static void get(const cdk::PhiloxKeys& K, uint64_t block,
                                             float eps[8]) {
    const cdk::Normals8 nz = cdk::keyed_normals16(K, block, 0u);
#pragma unroll
    for (int l = 0; l < 8; l += 2) round_pair(nz.n[l], nz.n[l + 1], eps + l);
  }
  // (a, b) rounded to T (nearest even) and widened back; one packed conversion for the pair.
  __device__ __forceinline__ static void round_pair(float a, float b, float out[2]);
};
template <>
__device__ __forceinline__ void StepNoise16<__half>::round_pair(float a, float b, float out[2]) {
  const __half2 p = __floats2half2_rn(a, b);
  out[0] = __low2float(p);
  out[1] = __high2float(p);
}
template <>
__device__ __forceinline__ void StepNoise16<__nv_bfloat16>::round_pair(float a, float b,
                                                                      float out[2]) {
  const __nv_bfloat162 p = __floats2bfloat162_rn(a, b);
  uint32_t u;  // (b16 << 16) | a16: widening is a shift and a mask
  __builtin_memcpy(&u, &p, 4);
  out[0] = cdk::bits_to_float(u << 16);
  out[1] = cdk::bits_to_float(u & 0xFFFF0000u);
}
template <> struct StepNoise<__half> : StepNoise16<__half> {};
template <> struct StepNoise<__nv_bfloat16> : StepNoise16<__nv_bfloat16> {};

// NPB elements starting at e (those < n; the others read as 0), scalar loads.
template <typename T, typename I, int NPB>
__device__ __forceinline__ void load_tail(const T* __restrict__ p, I e, I n, float v[NPB]) {
#pragma unroll
  for (int k = 0; k < NPB; k += 4) load_block_cs(p, e + (I)k, n, false, v + k);
}
template <typename T, typename I, int NPB>
__device__ __forceinline__ void store_tail(T* __restrict__ p, I e, I n, const float v[NPB]) {
#pragma unroll
  for (int k = 0; k < NPB; k += 4) store_block(p, e + (I)k, n, false, v + k);
}

// Channel of each of the L elements starting at e (the slow, general computation).
template <typename I, int L>
__device__ __forceinline__ void channels_of(I e, I chan_stride, uint32_t C, uint32_t c[L]) {
  ChanIter<I> ch(e, chan_stride, C);
#pragma unroll
  for (int j = 0; j < L; ++j) {
    c[j] = ch.c;
    ch.next(chan_stride, C);
  }
}

// Noise scale sigma[c]*sqrt(dt) of the L elements starting at e. Out of line: it is the slow
// path of the steady loop (grids where a thread's channels change between iterations).
template <typename I, int L>
__device__ __noinline__ void coefs_slow(const float* __restrict__ sigma, float sqrtdt, I e,
                                        I chan_stride, uint32_t C, float* coef) {
  uint32_t c[L];
  channels_of<I, L>(e, chan_stride, C, c);
#pragma unroll
  for (int j = 0; j < L; ++j) coef[j] = __fmul_rn(__ldg(sigma + c[j]), sqrtdt);
}

// bins[channel(e + j)] += v[j] with one atomic per element (slow path and tail; any control
// flow: no warp collectives).
template <int L> struct FloatsL { float v[L]; };  // by value: passed in registers, no local copy

template <typename I, int L>
__device__ __noinline__ void bins_add_slow(float* bins, I e, I n, I chan_stride, uint32_t C,
                                           FloatsL<L> val) {
  const float* v = val.v;
  uint32_t c[L];
  channels_of<I, L>(e, chan_stride, C, c);
#pragma unroll
  for (int j = 0; j < L; ++j)
    if (e + (I)j < n && v[j] != 0.0f) atomicAdd(bins + c[j], v[j]);
}

template <typename T, bool RELU, typename I, bool PERCHAN>
__global__ void __launch_bounds__(kThreads)
cd_step_fwd_kernel(const T* __restrict__ x, const T* __restrict__ f, T* __restrict__ y, I n,
                   float dt, float sqrtdt, const float* __restrict__ sigma, float coef_const,
                   I chan_stride, uint32_t C, const int64_t* __restrict__ seed_ptr,
                   uint64_t offset, bool vec, bool fixed_chan) {
  constexpr int L = 4 * kBPI<T>, NPB = StepNoise<T>::NPB;
  static_assert(NPB == L, "one Philox block per 16-byte vector");
  const cdk::PhiloxKeys K = cdk::philox_keys((uint64_t)__ldg(seed_ptr));
  // Non-per-channel noise scale: sigma_value*sqrt(dt) (host, double) or sigma[0]*sqrt(dt).
  float coef_u = coef_const;
  if (!PERCHAN && sigma != nullptr) coef_u = __fmul_rn(__ldg(sigma), sqrtdt);
  const I nblk = (n + (I)(NPB - 1)) / (I)NPB;  // Philox blocks of the stream
  const I nsup = vec ? n / (I)L : 0;           // full, aligned super-blocks
  const I stride = (I)gridDim.x * (I)blockDim.x;
  const I t0 = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x;
  float coef[L];
  if (PERCHAN) {
    coefs_slow<I, L>(sigma, sqrtdt, t0 * (I)L, chan_stride, C, coef);
  } else {
#pragma unroll
    for (int j = 0; j < L; ++j) coef[j] = coef_u;
  }
#pragma unroll 1
  for (I s = t0; s < nsup; s += stride) {
    const I e = s * (I)L;
    if (PERCHAN && !fixed_chan) coefs_slow<I, L>(sigma, sqrtdt, e, chan_stride, C, coef);
    float xv[L], fv[L], eps[L], out[L];
    Vec16<T>::load(x + e, xv);
    Vec16<T>::load(f + e, fv);
    StepNoise<T>::get(K, offset + (uint64_t)s, eps);
#pragma unroll
    for (int l = 0; l < L; ++l) {
      const float z = __fadd_rn(__fadd_rn(xv[l], __fmul_rn(dt, fv[l])), __fmul_rn(coef[l], eps[l]));
      out[l] = RELU ? relu_f(z) : z;
    }
    Vec16<T>::store(y + e, out);
  }
  // The rest, one Philox block (NPB elements) at a time, bounds-checked.
  for (I i = nsup + t0; i < nblk; i += stride) {
    const I e = i * (I)NPB;
    float xv[NPB], fv[NPB], cf[NPB], eps[NPB], out[NPB];
    load_tail<T, I, NPB>(x, e, n, xv);
    load_tail<T, I, NPB>(f, e, n, fv);
    if (PERCHAN) {
      coefs_slow<I, NPB>(sigma, sqrtdt, e, chan_stride, C, cf);
    } else {
#pragma unroll
      for (int j = 0; j < NPB; ++j) cf[j] = coef_u;
    }
    StepNoise<T>::get(K, offset + (uint64_t)i, eps);
#pragma unroll
    for (int j = 0; j < NPB; ++j) {
      const float z = __fadd_rn(__fadd_rn(xv[j], __fmul_rn(dt, fv[j])), __fmul_rn(cf[j], eps[j]));
      out[j] = RELU ? relu_f(z) : z;
    }
    store_tail<T, I, NPB>(y, e, n, out);
  }
}

template <typename T, bool RELU, typename I, int RED>
__global__ void __launch_bounds__(kThreads)
cd_step_bwd_kernel(const T* __restrict__ gy, const T* __restrict__ y, T* __restrict__ gx,
                   T* __restrict__ gf, float* __restrict__ gsig, I n, float dt, I chan_stride,
                   uint32_t C, const int64_t* __restrict__ seed_ptr, uint64_t offset, bool vec,
                   bool fixed_chan) {
  constexpr int BPI = kBPI<T>, L = 4 * BPI, NPB = StepNoise<T>::NPB;
  static_assert(NPB == L, "one Philox block per 16-byte vector");
  constexpr bool PERCHAN = RED == kRedSmem || RED == kRedGlobal;
  float* const sbins = dyn_smem_f32();
  float* bins = (RED == kRedSmem) ? sbins : gsig;
  if (RED == kRedSmem) {
    for (uint32_t c = threadIdx.x; c < C; c += blockDim.x) sbins[c] = 0.0f;
    __syncthreads();
  }
  const cdk::PhiloxKeys K = cdk::philox_keys(RED != kRedNone ? (uint64_t)__ldg(seed_ptr) : 0u);
  const I nblk = (n + (I)(NPB - 1)) / (I)NPB;  // Philox blocks of the stream
  const I nsup = vec ? n / (I)L : 0;
  const I stride = (I)gridDim.x * (I)blockDim.x;
  const I t0 = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x;
  float acc[L];  // per-lane grad_sigma partials (lane l: element e + l, fixed channel)
#pragma unroll
  for (int l = 0; l < L; ++l) acc[l] = 0.0f;
#pragma unroll 1
  for (I s = t0; s < nsup; s += stride) {
    const I e = s * (I)L;
    float gz[L];
    Vec16<T>::load(gy + e, gz);
    if (RELU) {
      float yv[L];
      Vec16<T>::load(y + e, yv);
#pragma unroll
      for (int l = 0; l < L; ++l) gz[l] = __fmul_rn(gz[l], (yv[l] > 0.0f) ? 1.0f : 0.0f);
    }
    if (gx != nullptr) Vec16<T>::store(gx + e, gz);
    if (gf != nullptr) {
      float t[L];
#pragma unroll
      for (int l = 0; l < L; ++l) t[l] = __fmul_rn(dt, gz[l]);
      Vec16<T>::store(gf + e, t);
    }
    if (RED != kRedNone) {
      float eps[L], v[L];
      StepNoise<T>::get(K, offset + (uint64_t)s, eps);
#pragma unroll
      for (int l = 0; l < L; ++l) v[l] = __fmul_rn(gz[l], eps[l]);
#pragma unroll
      for (int l = 0; l < L; ++l) acc[l] += v[l];
      if (PERCHAN && !fixed_chan) {
        // the thread's channels change between iterations: acc was zero (flushed after every
        // iteration), so it holds exactly v; add it to the bins now and start again from zero
        FloatsL<L> val;
#pragma unroll
        for (int l = 0; l < L; ++l) {
          val.v[l] = acc[l];
          acc[l] = 0.0f;
        }
        bins_add_slow<I, L>(bins, e, n, chan_stride, C, val);
      }
    }
  }
  // The rest, one Philox block (NPB elements) at a time, bounds-checked.
  for (I i = nsup + t0; i < nblk; i += stride) {
    const I e = i * (I)NPB;
    float gz[NPB];
    load_tail<T, I, NPB>(gy, e, n, gz);  // elements past n read as 0
    if (RELU) {
      float yv[NPB];
      load_tail<T, I, NPB>(y, e, n, yv);
#pragma unroll
      for (int j = 0; j < NPB; ++j) gz[j] = __fmul_rn(gz[j], (yv[j] > 0.0f) ? 1.0f : 0.0f);
    }
    if (gx != nullptr) store_tail<T, I, NPB>(gx, e, n, gz);
    if (gf != nullptr) {
      float t[NPB];
#pragma unroll
      for (int j = 0; j < NPB; ++j) t[j] = __fmul_rn(dt, gz[j]);
      store_tail<T, I, NPB>(gf, e, n, t);
    }
    if (RED != kRedNone) {
      float eps[NPB];
      StepNoise<T>::get(K, offset + (uint64_t)i, eps);
      FloatsL<NPB> val;
#pragma unroll
      for (int j = 0; j < NPB; ++j) val.v[j] = __fmul_rn(gz[j], eps[j]);
      if (PERCHAN) {
        bins_add_slow<I, NPB>(bins, e, n, chan_stride, C, val);
      } else {
        // pairwise: (v0 + v1) + (v2 + v3) for a float32 block, one more level for 16-bit
#pragma unroll
        for (int w = NPB; w > 1; w /= 2)
#pragma unroll
          for (int j = 0; j < w / 2; ++j) val.v[j] = val.v[2 * j] + val.v[2 * j + 1];
        acc[0] += val.v[0];
      }
    }
  }
  // Flush the per-lane partials. Every thread of the block gets here (uniform control flow).
  if (RED == kRedScalar) {
    float a = 0.0f;
#pragma unroll
    for (int l = 0; l < L; ++l) a += acc[l];
    const float s = block_sum_to_thread0(a);
    if (threadIdx.x == 0) atomicAdd(gsig, s);
  } else if (PERCHAN) {
    // channels of this thread's lanes (fixed across its iterations when fixed_chan; otherwise
    // acc is all zero and the bins already hold everything)
    uint32_t c[L];
    channels_of<I, L>(t0 * (I)L, chan_stride, C, c);
#pragma unroll
    for (int b = 0; b < BPI; ++b) warp_bin_add(bins, c + 4 * b, acc + 4 * b, true);
    if (RED == kRedSmem) {
      __syncthreads();
      for (uint32_t ch = threadIdx.x; ch < C; ch += blockDim.x) {
        const float s = sbins[ch];
        if (s != 0.0f) atomicAdd(gsig + ch, s);
      }
    }
  }
}

void check_step_act(int act, const char* op) {
  if (act != kActNone && act != kActRelu)
    throw std::invalid_argument(std::string("cdkernels CUDA ") + op +
                                ": act must be none (0) or relu (1), got " +
                                std::to_string(act));
}

}  // namespace

// -- the one dispatcher (used by the CUDA launchers below and by the host emulator) -------------
// `L` provides  unsigned L.grid(kernel, threads_needed, dyn_smem, multiple)  (a grid, a multiple
// of `multiple` where it can be, at most what the work needs) and
// void L.launch(kernel, grid, dyn_smem, args...).

// Grid multiple that makes one grid-stride step a multiple of the channel period C*chan_stride.
inline uint64_t chan_grid_multiple(int64_t C, int64_t chan_stride, int L) {
  const uint64_t P = (uint64_t)C * (uint64_t)chan_stride;
  const uint64_t D = (uint64_t)L * kThreads;  // elements per grid-stride step per block
  uint64_t a = P, b = D;
  while (b) { const uint64_t t = a % b; a = b; b = t; }
  return P / a;
}

template <typename T, typename I, class Lz>
void step_fwd_typed(Lz& Lr, int64_t n, uintptr_t x, uintptr_t f, uintptr_t y, double dt,
                    uintptr_t sigma, double sigma_value, int64_t C, int64_t chan_stride,
                    uintptr_t seed, uint64_t offset, int act) {
  constexpr int L = 4 * kBPI<T>;
  const bool vec = aligned_to(x, 16) && aligned_to(f, 16) && aligned_to(y, 16);
  const float dt_f = (float)dt;
  const float sqrtdt_f = (float)std::sqrt(dt);
  const float coef_const = (float)(sigma_value * std::sqrt(dt));
  const bool perchan = sigma != 0 && C > 1;
  const uint64_t nsup = ((uint64_t)n + L - 1) / L;
  auto go = [&](auto kernel) {
    const uint64_t mult = perchan ? chan_grid_multiple(C, chan_stride, L) : 1;
    const unsigned grid = Lr.grid(kernel, nsup, 0, mult);
    const bool fixed = (uint64_t)grid * kThreads >= nsup || ((uint64_t)grid % mult) == 0;
    Lr.launch(kernel, grid, 0, reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(f),
              reinterpret_cast<T*>(y), (I)n, dt_f, sqrtdt_f, reinterpret_cast<const float*>(sigma),
              coef_const, (I)chan_stride, (uint32_t)C, reinterpret_cast<const int64_t*>(seed),
              offset, vec, fixed);
  };
  if (act == kActRelu) {
    if (perchan) go(cd_step_fwd_kernel<T, true, I, true>);
    else go(cd_step_fwd_kernel<T, true, I, false>);
  } else {
    if (perchan) go(cd_step_fwd_kernel<T, false, I, true>);
    else go(cd_step_fwd_kernel<T, false, I, false>);
  }
}

template <class Lz>
void step_fwd_dispatch(Lz& Lr, bool force64, int dtype, int64_t n, uintptr_t x, uintptr_t f,
                       uintptr_t y, double dt, uintptr_t sigma, double sigma_value, int64_t C,
                       int64_t chan_stride, uintptr_t seed, uint64_t offset, int act) {
  const bool small = !force64 && n < ((int64_t)1 << 31);
  CDK_DISPATCH_DTYPE(dtype, T, {
    if (small) step_fwd_typed<T, uint32_t>(Lr, n, x, f, y, dt, sigma, sigma_value, C, chan_stride, seed, offset, act);
    else step_fwd_typed<T, uint64_t>(Lr, n, x, f, y, dt, sigma, sigma_value, C, chan_stride, seed, offset, act);
  });
}

template <typename T, typename I, bool RELU, class Lz>
void step_bwd_typed(Lz& Lr, int64_t n, uintptr_t gy, uintptr_t y, uintptr_t gx, uintptr_t gf,
                    uintptr_t gsig, double dt, int64_t C, int64_t chan_stride, uintptr_t seed,
                    uint64_t offset) {
  constexpr int L = 4 * kBPI<T>;
  const bool vec = aligned_to(gy, 16) && aligned_to(y, 16) && aligned_to(gx, 16) &&
                   aligned_to(gf, 16);  // absent pointers (0) are aligned
  const uint64_t nsup = ((uint64_t)n + L - 1) / L;
  const int red = choose_red_mode(gsig != 0, C);
  auto go = [&](auto kernel, size_t smem) {
    const bool perchan = red == kRedSmem || red == kRedGlobal;
    const uint64_t mult = perchan ? chan_grid_multiple(C, chan_stride, L) : 1;
    const unsigned grid = Lr.grid(kernel, nsup, smem, mult);
    const bool fixed = (uint64_t)grid * kThreads >= nsup || ((uint64_t)grid % mult) == 0;
    Lr.launch(kernel, grid, smem, reinterpret_cast<const T*>(gy), reinterpret_cast<const T*>(y),
              reinterpret_cast<T*>(gx), reinterpret_cast<T*>(gf), reinterpret_cast<float*>(gsig),
              (I)n, (float)dt, (I)chan_stride, (uint32_t)C,
              reinterpret_cast<const int64_t*>(seed), offset, vec, fixed);
  };
  switch (red) {
    case kRedNone: go(cd_step_bwd_kernel<T, RELU, I, kRedNone>, 0); break;
    case kRedScalar: go(cd_step_bwd_kernel<T, RELU, I, kRedScalar>, 0); break;
    case kRedSmem: go(cd_step_bwd_kernel<T, RELU, I, kRedSmem>, (size_t)C * sizeof(float)); break;
    default: go(cd_step_bwd_kernel<T, RELU, I, kRedGlobal>, 0); break;
  }
}

template <class Lz>
void step_bwd_dispatch(Lz& Lr, bool force64, int dtype, int64_t n, uintptr_t gy, uintptr_t y,
                       uintptr_t gx, uintptr_t gf, uintptr_t gsig, double dt, int64_t C,
                       int64_t chan_stride, uintptr_t seed, uint64_t offset, int act) {
  const bool small = !force64 && n < ((int64_t)1 << 31);
  CDK_DISPATCH_DTYPE(dtype, T, {
    if (act == kActRelu) {
      if (small) step_bwd_typed<T, uint32_t, true>(Lr, n, gy, y, gx, gf, gsig, dt, C, chan_stride, seed, offset);
      else step_bwd_typed<T, uint64_t, true>(Lr, n, gy, y, gx, gf, gsig, dt, C, chan_stride, seed, offset);
    } else {
      if (small) step_bwd_typed<T, uint32_t, false>(Lr, n, gy, y, gx, gf, gsig, dt, C, chan_stride, seed, offset);
      else step_bwd_typed<T, uint64_t, false>(Lr, n, gy, y, gx, gf, gsig, dt, C, chan_stride, seed, offset);
    }
  });
}

#ifndef CDK_EMULATE  // host launchers (a host-only emulation build compiles the kernels alone)
void cd_step_fwd(int device, uintptr_t stream, int dtype, int64_t n, uintptr_t x, uintptr_t f,
                 uintptr_t y, double dt, uintptr_t sigma, double sigma_value, int64_t C,
                 int64_t chan_stride, uintptr_t seed, uint64_t offset, int act) {
  check_dtype(dtype, "cd_step_fwd");
  check_step_act(act, "cd_step_fwd");
  check_channels(C, chan_stride, "cd_step_fwd");
  if (n <= 0) return;
  chan_stride = std::min(chan_stride, n);  // same channels for every p < n; fits I
  DeviceGuard guard(device);
  CudaLauncher Lr{as_stream(stream), "cd_step_fwd_kernel"};
  step_fwd_dispatch(Lr, false, dtype, n, x, f, y, dt, sigma, sigma_value, C, chan_stride, seed,
                    offset, act);
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
  CudaLauncher Lr{as_stream(stream), "cd_step_bwd_kernel"};
  step_bwd_dispatch(Lr, false, dtype, n, grad_y, y, grad_x, grad_f, grad_sigma, dt, C,
                    chan_stride, seed, offset, act);
}
#endif  // CDK_EMULATE

}  // namespace cdk_cuda
