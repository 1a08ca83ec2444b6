// ensemble.cu -- mean over K replicas: inp [K, B, C] contiguous -> out [B, C].
//   prob:    out = (1/K) sum_k softmax(inp[k])
//   logit:   out = (1/K) sum_k inp[k]
//   logprob: out = log((1/K) sum_k softmax(inp[k])) = LSE_k(log_softmax(inp[k])) - log K
// and their backward passes (reference.py, ReferenceBackend.ensemble_mean_bwd).
//
// prob/logprob, C <= 8192 ("rows" kernels): one group of G threads per output row b (G = 32:
// one warp, several rows per block; G > 32: the whole block). Each thread keeps VPT columns
// c = gt + j*G of the row in registers; the group loops over k with rows prefetched (two ahead,
// one for VPT = 16) and per (k, b) row does a max and a sum reduction (warp shuffles; for G > 32
// a second level through double-buffered shared memory, one __syncthreads per reduction).
// Forward accumulates the mean probability (prob) or a running per-column log-sum-exp (logprob)
// in fp32 registers, so the input is read exactly once. Backward (logprob, 16-bit dtypes) first
// recomputes out in fp32, as the reference does (its stored 16-bit value is rounded): one more
// pass over the K rows.
// C > 8192 ("big" kernels): one block per row b, per-replica statistics in shared memory
// (K floats), several passes over the row (input read 2x forward, 3x backward).
// Backward gradients are scaled by *(1/K) (reference: /K; at most 1 ulp apart).
#include "common.cuh"

namespace cdk_cuda {
namespace {

constexpr float kNegInf = -__builtin_huge_valf();

// -- group reductions ---------------------------------------------------------------------------
// G == 32: a warp, shuffles only. G > 32: G == blockDim.x; partials go through `scratch`
// (2 parities x 2 values x 32 floats). Consecutive reductions alternate parity, so one
// __syncthreads per reduction suffices: a buffer is rewritten only two reductions later, after
// every thread has passed the barrier of the reduction in between (so has read it).
// All threads of the group must call these in the same order (uniform control flow).
template <int G>
__device__ __forceinline__ float group_max(float v, float* scratch, int& par) {
  v = warp_max(v);
  if constexpr (G > 32) {
    constexpr int NW = G / 32;
    float* buf = scratch + par * 64;
    if ((threadIdx.x & 31) == 0) buf[threadIdx.x >> 5] = v;
    __syncthreads();
    // Second level: every thread reads the NW partials in the same order (no shuffles, so no
    // convergence assumptions; bit-identical results in all threads).
    v = buf[0];
#pragma unroll
    for (int w = 1; w < NW; ++w) v = fmaxf(v, buf[w]);
    par ^= 1;
  }
  return v;
}

template <int G>
__device__ __forceinline__ float group_sum(float v, float* scratch, int& par) {
  v = warp_sum(v);
  if constexpr (G > 32) {
    constexpr int NW = G / 32;
    float* buf = scratch + par * 64;
    if ((threadIdx.x & 31) == 0) buf[threadIdx.x >> 5] = v;
    __syncthreads();
    v = buf[0];
#pragma unroll
    for (int w = 1; w < NW; ++w) v += buf[w];
    par ^= 1;
  }
  return v;
}

template <int G>
__device__ __forceinline__ void group_sum2(float& a, float& b, float* scratch, int& par) {
  a = warp_sum(a);
  b = warp_sum(b);
  if constexpr (G > 32) {
    constexpr int NW = G / 32;
    float* buf = scratch + par * 64;
    if ((threadIdx.x & 31) == 0) {
      buf[threadIdx.x >> 5] = a;
      buf[32 + (threadIdx.x >> 5)] = b;
    }
    __syncthreads();
    a = buf[0];
    b = buf[32];
#pragma unroll
    for (int w = 1; w < NW; ++w) {
      a += buf[w];
      b += buf[32 + w];
    }
    par ^= 1;
  }
}

// Running log-sum-exp (M, S) of a column: LSE = M + log S. Handles -inf (S stays 0, M -inf).
__device__ __forceinline__ void lse_update(float& M, float& S, float l) {
  const float mx = fmaxf(M, l), mn = fminf(M, l);
  const float e = (mn == kNegInf) ? 0.0f : expf(mn - mx);
  S = (l > M) ? __fmaf_rn(S, e, 1.0f) : S + e;
  M = mx;
}

template <typename T, int G, int VPT>
__device__ __forceinline__ void load_row(const T* __restrict__ p, int gt, int64_t C, float pad,
                                         float z[VPT]) {
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int64_t c = gt + (int64_t)j * G;
    z[j] = (c < C) ? ld_cs(p + c) : pad;
  }
}

// -- rows kernels (C <= G*VPT) ------------------------------------------------------------------
// Rows ahead in flight: depth 2 (z0 = row k+1, z1 = row k+2) for VPT <= 8; depth 1 (z0 only)
// for VPT = 16, whose 512-thread blocks must fit 128 registers.
template <int VPT> constexpr int kPrefetchDepth = VPT >= 16 ? 1 : 2;

template <typename T, int G, int VPT>
__device__ __forceinline__ void prefetch_start(const T* __restrict__ rowp, int64_t BC, int64_t K,
                                               int gt, int64_t C, float z0[VPT], float z1[VPT]) {
  load_row<T, G, VPT>(rowp, gt, C, kNegInf, z0);
  if (kPrefetchDepth<VPT> == 2) {
    if (K > 1) {
      load_row<T, G, VPT>(rowp + BC, gt, C, kNegInf, z1);
    } else {
#pragma unroll
      for (int j = 0; j < VPT; ++j) z1[j] = kNegInf;  // never used; keeps the copy defined
    }
  }
}
template <typename T, int G, int VPT>
__device__ __forceinline__ void prefetch_step(const T* __restrict__ rowp, int64_t BC, int64_t K,
                                              int64_t k, int gt, int64_t C, float z[VPT],
                                              float z0[VPT], float z1[VPT]) {
  if (kPrefetchDepth<VPT> == 2) {
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      z[j] = z0[j];
      z0[j] = z1[j];
    }
    if (k + 2 < K) load_row<T, G, VPT>(rowp + (k + 2) * BC, gt, C, kNegInf, z1);
  } else {
#pragma unroll
    for (int j = 0; j < VPT; ++j) z[j] = z0[j];
    if (k + 1 < K) load_row<T, G, VPT>(rowp + (k + 1) * BC, gt, C, kNegInf, z0);
  }
}

// out_c = log((1/K) sum_k softmax(z_k)_c) for the group's columns, in fp32 registers:
// a running log-sum-exp over k of log_softmax(z_k) = (z - m_k) - log(s_k). One pass over K rows.
template <typename T, int G, int VPT>
__device__ __forceinline__ void column_log_mean_prob(const T* __restrict__ rowp, int64_t BC,
                                                     int64_t K, int64_t C, int gt, float logK,
                                                     float* scratch, int& par, float o[VPT]) {
  float M[VPT], S[VPT];
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    M[j] = kNegInf;
    S[j] = 0.0f;
  }
  bool nan_row = false;  // some replica row had a NaN log-sum-exp (torch propagates it)
  float z0[VPT], z1[VPT];
  prefetch_start<T, G, VPT>(rowp, BC, K, gt, C, z0, z1);
  for (int64_t k = 0; k < K; ++k) {
    float z[VPT];
    prefetch_step<T, G, VPT>(rowp, BC, K, k, gt, C, z, z0, z1);
    float m = kNegInf;
#pragma unroll
    for (int j = 0; j < VPT; ++j) m = fmaxf(m, z[j]);
    m = group_max<G>(m, scratch, par);
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < VPT; ++j) s += expf(z[j] - m);  // padding: exp(-inf) = 0
    s = group_sum<G>(s, scratch, par);
    const float ls = logf(s);
    nan_row |= isnan(ls);
#pragma unroll
    for (int j = 0; j < VPT; ++j) lse_update(M[j], S[j], (z[j] - m) - ls);
  }
#pragma unroll
  for (int j = 0; j < VPT; ++j)
    o[j] = nan_row ? __int_as_float(0x7fc00000) : (M[j] + logf(S[j])) - logK;
}

template <typename T, bool LOGP, int G, int VPT, int BLOCK>
__global__ void __launch_bounds__(BLOCK)
ens_fwd_rows_kernel(const T* __restrict__ inp, T* __restrict__ out, int64_t K, int64_t B,
                    int64_t C, float logK) {
  static_assert(G == 32 || G == BLOCK, "a group is a warp or the whole block");
  constexpr int RPB = BLOCK / G;
  __shared__ float scratch[G > 32 ? 128 : 1];
  int par = 0;
  const int gt = threadIdx.x % G;
  const int64_t BC = B * C;
  // G == 32: each warp loops over its own rows (no block barriers). G > 32: RPB == 1, the loop
  // is block-uniform.
  for (int64_t b = (int64_t)blockIdx.x * RPB + threadIdx.x / G; b < B;
       b += (int64_t)gridDim.x * RPB) {
    const T* rowp = inp + b * C;
    float r[VPT];
    if (LOGP) {
      column_log_mean_prob<T, G, VPT>(rowp, BC, K, C, gt, logK, scratch, par, r);
    } else {
      float acc[VPT];  // sum_k p
#pragma unroll
      for (int j = 0; j < VPT; ++j) acc[j] = 0.0f;
      float z0[VPT], z1[VPT];
      prefetch_start<T, G, VPT>(rowp, BC, K, gt, C, z0, z1);
      for (int64_t k = 0; k < K; ++k) {
        float z[VPT];
        prefetch_step<T, G, VPT>(rowp, BC, K, k, gt, C, z, z0, z1);
        float m = kNegInf;
#pragma unroll
        for (int j = 0; j < VPT; ++j) m = fmaxf(m, z[j]);
        m = group_max<G>(m, scratch, par);
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < VPT; ++j) {
          z[j] = expf(z[j] - m);  // padding: exp(-inf) = 0
          s += z[j];
        }
        s = group_sum<G>(s, scratch, par);
        const float inv = 1.0f / s;
#pragma unroll
        for (int j = 0; j < VPT; ++j) acc[j] += z[j] * inv;
      }
#pragma unroll
      for (int j = 0; j < VPT; ++j) r[j] = acc[j] / (float)K;
    }
    T* orow = out + b * C;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int64_t c = gt + (int64_t)j * G;
      if (c < C) st(orow + c, r[j]);
    }
  }
}

template <typename T, bool LOGP, int G, int VPT, int BLOCK>
__global__ void __launch_bounds__(BLOCK)
ens_bwd_rows_kernel(const T* __restrict__ gout, const T* __restrict__ inp,
                    const T* __restrict__ out, T* __restrict__ gin, int64_t K, int64_t B,
                    int64_t C, float logK, float invK) {
  static_assert(G == 32 || G == BLOCK, "a group is a warp or the whole block");
  constexpr int RPB = BLOCK / G;
  __shared__ float scratch[G > 32 ? 128 : 1];
  int par = 0;
  const int gt = threadIdx.x % G;
  const int64_t BC = B * C;
  for (int64_t b = (int64_t)blockIdx.x * RPB + threadIdx.x / G; b < B;
       b += (int64_t)gridDim.x * RPB) {
    const T* rowp = inp + b * C;
    // logprob: out as the reference uses it: the stored fp32 output, or for 16-bit dtypes
    // log(mean p) recomputed in fp32 (one extra pass over the K rows; the stored 16-bit
    // output is rounded).
    constexpr bool kRecomputeOut = LOGP && sizeof(T) != sizeof(float);
    float g[VPT], o[VPT];
    if (kRecomputeOut) column_log_mean_prob<T, G, VPT>(rowp, BC, K, C, gt, logK, scratch, par, o);
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int64_t c = gt + (int64_t)j * G;
      g[j] = (c < C) ? ld(gout + b * C + c) : 0.0f;
      // padding slots: o = 0 keeps q = 0 * exp(-inf) = 0 (a recomputed o there is -inf)
      if (!kRecomputeOut || c >= C) o[j] = (LOGP && c < C) ? ld(out + b * C + c) : 0.0f;
    }
    float z0[VPT], z1[VPT];
    prefetch_start<T, G, VPT>(rowp, BC, K, gt, C, z0, z1);
    for (int64_t k = 0; k < K; ++k) {
      float z[VPT];
      prefetch_step<T, G, VPT>(rowp, BC, K, k, gt, C, z, z0, z1);

      float m = kNegInf;
#pragma unroll
      for (int j = 0; j < VPT; ++j) m = fmaxf(m, z[j]);
      m = group_max<G>(m, scratch, par);
      T* grow = gin + k * BC + b * C;
      if (!LOGP) {
        // p = e/s, dot = sum g*p = (sum g*e)/s; grad = p*(g - dot)/K.
        float s = 0.0f, d = 0.0f;
#pragma unroll
        for (int j = 0; j < VPT; ++j) {
          z[j] = expf(z[j] - m);  // e; padding: exp(-inf) = 0
          s += z[j];
          d += g[j] * z[j];
        }
        group_sum2<G>(s, d, scratch, par);
        const float inv = 1.0f / s;
        const float dot = d * inv;
#pragma unroll
        for (int j = 0; j < VPT; ++j) {
          const int64_t c = gt + (int64_t)j * G;
          if (c < C) st(grow + c, ((z[j] * inv) * (g[j] - dot)) * invK);
        }
      } else {
        // q = g*exp(z - lse - out), p = exp(z - lse); grad = (q - p*sum q)/K.
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < VPT; ++j) s += expf(z[j] - m);
        s = group_sum<G>(s, scratch, par);
        const float lse = m + logf(s);
        float sq = 0.0f;
#pragma unroll
        for (int j = 0; j < VPT; ++j) {
          z[j] = z[j] - lse;               // log p; padding: -inf
          sq += g[j] * expf(z[j] - o[j]);  // q; padding: 0 * exp(-inf) = 0
        }
        sq = group_sum<G>(sq, scratch, par);
#pragma unroll
        for (int j = 0; j < VPT; ++j) {  // q recomputed (same value) instead of held: registers
          const int64_t c = gt + (int64_t)j * G;
          if (c < C) st(grow + c, (g[j] * expf(z[j] - o[j]) - expf(z[j]) * sq) * invK);
        }
      }
    }
  }
}

// -- big-C kernels (one block of kBigThreads per row, statistics in shared memory) ----------------
constexpr int kBigThreads = 512;

// log-sum-exp of row p[0..C) over the block (every thread gets it). NaN if the row has a NaN.
template <typename T>
__device__ __forceinline__ float block_row_lse(const T* __restrict__ p, int64_t C,
                                               float* scratch, int& par) {
  float M = kNegInf, S = 0.0f;
  bool bad = false;
  for (int64_t c = threadIdx.x; c < C; c += kBigThreads) {
    const float z = ld(p + c);
    bad |= isnan(z);
    lse_update(M, S, z);
  }
  const float m = group_max<kBigThreads>(M, scratch, par);
  float s = (M == kNegInf) ? 0.0f : S * expf(M - m);
  if (bad) s = __int_as_float(0x7fc00000);
  s = group_sum<kBigThreads>(s, scratch, par);
  return m + logf(s);
}

template <typename T, bool LOGP>
__global__ void __launch_bounds__(kBigThreads)
ens_fwd_big_kernel(const T* __restrict__ inp, T* __restrict__ out, int64_t K, int64_t B,
                   int64_t C, float logK) {
  float* const lse_sh = dyn_smem_f32();  // [K]
  __shared__ float scratch[128];
  int par = 0;
  const int64_t BC = B * C;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    for (int64_t k = 0; k < K; ++k) {
      const float lse = block_row_lse(inp + k * BC + b * C, C, scratch, par);
      if (threadIdx.x == 0) lse_sh[k] = lse;
    }
    __syncthreads();
    for (int64_t c = threadIdx.x; c < C; c += kBigThreads) {
      float acc = LOGP ? kNegInf : 0.0f, acc2 = 0.0f;
      bool bad = false;
      for (int64_t k = 0; k < K; ++k) {
        const float l = ld(inp + k * BC + b * C + c) - lse_sh[k];
        if (!LOGP) {
          acc += expf(l);
        } else {
          bad |= isnan(lse_sh[k]);
          lse_update(acc, acc2, l);
        }
      }
      float r;
      if (!LOGP) {
        r = acc / (float)K;
      } else {
        r = (acc + logf(acc2)) - logK;
        if (bad) r = __int_as_float(0x7fc00000);
      }
      st(out + b * C + c, r);
    }
    __syncthreads();  // lse_sh is rewritten for the next row
  }
}

// log(mean_k p_kc) of column c of row b, from the replica log-sum-exps lse_sh[0..K) (fp32).
template <typename T>
__device__ __forceinline__ float big_column_log_mean_prob(const T* __restrict__ colp, int64_t BC,
                                                          int64_t K, const float* lse_sh,
                                                          float logK) {
  float M = kNegInf, S = 0.0f;
  bool bad = false;
  for (int64_t k = 0; k < K; ++k) {
    bad |= isnan(lse_sh[k]);
    lse_update(M, S, ld(colp + k * BC) - lse_sh[k]);
  }
  return bad ? __int_as_float(0x7fc00000) : (M + logf(S)) - logK;
}

template <typename T, bool LOGP>
__global__ void __launch_bounds__(kBigThreads)
ens_bwd_big_kernel(const T* __restrict__ gout, const T* __restrict__ inp,
                   const T* __restrict__ out, T* __restrict__ gin, int64_t K, int64_t B,
                   int64_t C, float logK, float invK) {
  // logprob with a 16-bit dtype: out recomputed in fp32 (as the reference does), on the fly,
  // O(K) loads per use -- this fallback is only for C > kMaxRowsC.
  constexpr bool kRecomputeOut = LOGP && sizeof(T) != sizeof(float);
  float* const stat_sh = dyn_smem_f32();  // lse [K], then dot / sum q [K]
  float* lse_sh = stat_sh;
  float* dot_sh = stat_sh + K;
  __shared__ float scratch[128];
  int par = 0;
  const int64_t BC = B * C;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const T* g_b = gout + b * C;
    const T* o_b = out + b * C;
    const T* z_b = inp + b * C;
    for (int64_t k = 0; k < K; ++k) {
      const float lse = block_row_lse(z_b + k * BC, C, scratch, par);
      if (threadIdx.x == 0) lse_sh[k] = lse;
    }
    __syncthreads();  // lse_sh complete
    for (int64_t k = 0; k < K; ++k) {
      const T* zr = z_b + k * BC;
      const float lse = lse_sh[k];
      float d = 0.0f;
      for (int64_t c = threadIdx.x; c < C; c += kBigThreads) {
        const float zl = ld(zr + c) - lse;
        if (LOGP) {
          const float ov = kRecomputeOut ? big_column_log_mean_prob(z_b + c, BC, K, lse_sh, logK)
                                         : ld(o_b + c);
          d += ld(g_b + c) * expf(zl - ov);
        } else {
          d += ld(g_b + c) * expf(zl);
        }
      }
      d = group_sum<kBigThreads>(d, scratch, par);
      if (threadIdx.x == 0) dot_sh[k] = d;
    }
    __syncthreads();  // dot_sh complete
    for (int64_t c = threadIdx.x; c < C; c += kBigThreads) {
      const float gv = ld(g_b + c);
      float ov = 0.0f;
      if (LOGP)
        ov = kRecomputeOut ? big_column_log_mean_prob(z_b + c, BC, K, lse_sh, logK) : ld(o_b + c);
      for (int64_t k = 0; k < K; ++k) {
        const float zl = ld(z_b + k * BC + c) - lse_sh[k];
        const float p = expf(zl);
        float r;
        if (!LOGP) {
          r = (p * (gv - dot_sh[k])) * invK;
        } else {
          const float q = gv * expf(zl - ov);
          r = (q - p * dot_sh[k]) * invK;
        }
        st(gin + k * BC + b * C + c, r);
      }
    }
    __syncthreads();  // stat_sh is rewritten for the next row
  }
}

// -- logit space: elementwise over the B*C outputs ----------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads)
ens_fwd_logit_kernel(const T* __restrict__ inp, T* __restrict__ out, int64_t K, int64_t BC) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < BC; i += stride) {
    float acc = 0.0f;
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {  // 4 independent loads in flight, summed in order
      const float a0 = ld_cs(inp + (k + 0) * BC + i), a1 = ld_cs(inp + (k + 1) * BC + i);
      const float a2 = ld_cs(inp + (k + 2) * BC + i), a3 = ld_cs(inp + (k + 3) * BC + i);
      acc = (((acc + a0) + a1) + a2) + a3;
    }
    for (; k < K; ++k) acc += ld_cs(inp + k * BC + i);
    st(out + i, acc / (float)K);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
ens_bwd_logit_kernel(const T* __restrict__ gout, T* __restrict__ gin, int64_t K, int64_t BC) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < BC; i += stride) {
    const T v = from_f<T>(ld(gout + i) / (float)K);
    for (int64_t k = 0; k < K; ++k) gin[k * BC + i] = v;
  }
}

// -- configuration ---------------------------------------------------------------------------------
constexpr int64_t kMaxRowsC = 8192;  // larger C uses the big-C kernels

// Picks (G, VPT, BLOCK) for C <= kMaxRowsC and calls F::template run<G, VPT, BLOCK>().
template <typename F>
void dispatch_rows(int64_t C, F&& f) {
  if (C <= 32) f.template run<32, 1, 256>();
  else if (C <= 64) f.template run<32, 2, 256>();
  else if (C <= 128) f.template run<32, 4, 256>();
  else if (C <= 256) f.template run<32, 8, 256>();
  else if (C <= 512) f.template run<128, 4, 128>();
  else if (C <= 1024) f.template run<128, 8, 128>();
  else if (C <= 2048) f.template run<256, 8, 256>();
  else if (C <= 4096) f.template run<512, 8, 512>();
  else f.template run<512, 16, 512>();
}

#ifndef CDK_EMULATE  // host launchers (a host-only emulation build compiles the kernels alone)
// -- launchers ----------------------------------------------------------------------------------
unsigned rows_grid(int64_t B, int rows_per_block) {
  const int64_t need = (B + rows_per_block - 1) / rows_per_block;
  return (unsigned)std::max<int64_t>(1, std::min<int64_t>(need, (int64_t)INT32_MAX));
}

template <typename T, bool LOGP, int G, int VPT, int BLOCK>
void run_fwd_rows(cudaStream_t st, uintptr_t inp, uintptr_t out, int64_t K, int64_t B, int64_t C,
                  float logK) {
  ens_fwd_rows_kernel<T, LOGP, G, VPT, BLOCK><<<rows_grid(B, BLOCK / G), BLOCK, 0, st>>>(
      reinterpret_cast<const T*>(inp), reinterpret_cast<T*>(out), K, B, C, logK);
  check_launch("ens_fwd_rows_kernel");
}

template <typename T, bool LOGP, int G, int VPT, int BLOCK>
void run_bwd_rows(cudaStream_t st, uintptr_t gout, uintptr_t inp, uintptr_t out, uintptr_t gin,
                  int64_t K, int64_t B, int64_t C, float logK) {
  ens_bwd_rows_kernel<T, LOGP, G, VPT, BLOCK><<<rows_grid(B, BLOCK / G), BLOCK, 0, st>>>(
      reinterpret_cast<const T*>(gout), reinterpret_cast<const T*>(inp),
      reinterpret_cast<const T*>(out), reinterpret_cast<T*>(gin), K, B, C, logK, 1.0f / (float)K);
  check_launch("ens_bwd_rows_kernel");
}

template <typename T, bool LOGP>
struct FwdRows {
  cudaStream_t st; uintptr_t inp, out; int64_t K, B, C; float logK;
  template <int G, int VPT, int BLOCK> void run() {
    run_fwd_rows<T, LOGP, G, VPT, BLOCK>(st, inp, out, K, B, C, logK);
  }
};
template <typename T, bool LOGP>
struct BwdRows {
  cudaStream_t st; uintptr_t gout, inp, out, gin; int64_t K, B, C; float logK;
  template <int G, int VPT, int BLOCK> void run() {
    run_bwd_rows<T, LOGP, G, VPT, BLOCK>(st, gout, inp, out, gin, K, B, C, logK);
  }
};

size_t big_smem(int64_t K, int per_k, const char* op) {
  const size_t bytes = (size_t)K * per_k * sizeof(float);
  if (bytes > 48 * 1024)
    throw std::invalid_argument(std::string("cdkernels CUDA ") + op + ": K=" + std::to_string(K) +
                                " replicas is too many for C > " + std::to_string(kMaxRowsC));
  return bytes;
}

void check_space(int space, const char* op) {
  if (space != kSpaceProb && space != kSpaceLogit && space != kSpaceLogprob)
    throw std::invalid_argument(std::string("cdkernels CUDA ") + op + ": bad space code " +
                                std::to_string(space));
}

template <typename T, bool LOGP>
void fwd_softmax_space(cudaStream_t st, uintptr_t inp, uintptr_t out, int64_t K, int64_t B,
                       int64_t C) {
  const float logK = (float)std::log((double)K);
  if (C <= kMaxRowsC) {
    dispatch_rows(C, FwdRows<T, LOGP>{st, inp, out, K, B, C, logK});
  } else {
    const size_t smem = big_smem(K, 1, "ensemble_mean_fwd");
    ens_fwd_big_kernel<T, LOGP><<<rows_grid(B, 1), kBigThreads, smem, st>>>(
        reinterpret_cast<const T*>(inp), reinterpret_cast<T*>(out), K, B, C, logK);
    check_launch("ens_fwd_big_kernel");
  }
}

template <typename T, bool LOGP>
void bwd_softmax_space(cudaStream_t st, uintptr_t gout, uintptr_t inp, uintptr_t out,
                       uintptr_t gin, int64_t K, int64_t B, int64_t C) {
  const float logK = (float)std::log((double)K);
  if (C <= kMaxRowsC) {
    dispatch_rows(C, BwdRows<T, LOGP>{st, gout, inp, out, gin, K, B, C, logK});
  } else {
    const size_t smem = big_smem(K, 2, "ensemble_mean_bwd");
    ens_bwd_big_kernel<T, LOGP><<<rows_grid(B, 1), kBigThreads, smem, st>>>(
        reinterpret_cast<const T*>(gout), reinterpret_cast<const T*>(inp),
        reinterpret_cast<const T*>(out), reinterpret_cast<T*>(gin), K, B, C, logK,
        1.0f / (float)K);
    check_launch("ens_bwd_big_kernel");
  }
}

}  // namespace

void ensemble_mean_fwd(int device, uintptr_t stream, int dtype, uintptr_t inp, uintptr_t out,
                       int64_t K, int64_t B, int64_t C, int space) {
  check_dtype(dtype, "ensemble_mean_fwd");
  check_space(space, "ensemble_mean_fwd");
  if (K < 0 || B < 0 || C < 0) throw std::invalid_argument("cdkernels CUDA ensemble_mean_fwd: bad shape");
  if (B == 0 || C == 0) return;
  if (K == 0) throw std::invalid_argument("cdkernels CUDA ensemble_mean_fwd: K == 0");
  DeviceGuard guard(device);
  const cudaStream_t st = as_stream(stream);
  CDK_DISPATCH_DTYPE(dtype, T, {
    if (space == kSpaceLogit) {
      auto kernel = ens_fwd_logit_kernel<T>;
      const unsigned grid = grid_for(kernel, kThreads, (uint64_t)(B * C));
      kernel<<<grid, kThreads, 0, st>>>(reinterpret_cast<const T*>(inp), reinterpret_cast<T*>(out),
                                        K, B * C);
      check_launch("ens_fwd_logit_kernel");
    } else if (space == kSpaceProb) {
      fwd_softmax_space<T, false>(st, inp, out, K, B, C);
    } else {
      fwd_softmax_space<T, true>(st, inp, out, K, B, C);
    }
  });
}

void ensemble_mean_bwd(int device, uintptr_t stream, int dtype, uintptr_t grad_out, uintptr_t inp,
                       uintptr_t out, uintptr_t grad_in, int64_t K, int64_t B, int64_t C,
                       int space) {
  check_dtype(dtype, "ensemble_mean_bwd");
  check_space(space, "ensemble_mean_bwd");
  if (K < 0 || B < 0 || C < 0) throw std::invalid_argument("cdkernels CUDA ensemble_mean_bwd: bad shape");
  if (K == 0 || B == 0 || C == 0) return;
  DeviceGuard guard(device);
  const cudaStream_t st = as_stream(stream);
  CDK_DISPATCH_DTYPE(dtype, T, {
    if (space == kSpaceLogit) {
      auto kernel = ens_bwd_logit_kernel<T>;
      const unsigned grid = grid_for(kernel, kThreads, (uint64_t)(B * C));
      kernel<<<grid, kThreads, 0, st>>>(reinterpret_cast<const T*>(grad_out),
                                        reinterpret_cast<T*>(grad_in), K, B * C);
      check_launch("ens_bwd_logit_kernel");
    } else if (space == kSpaceProb) {
      bwd_softmax_space<T, false>(st, grad_out, inp, out, grad_in, K, B, C);
    } else {
      bwd_softmax_space<T, true>(st, grad_out, inp, out, grad_in, K, B, C);
    }
  });
}

#else
}  // namespace
#endif  // CDK_EMULATE

}  // namespace cdk_cuda
