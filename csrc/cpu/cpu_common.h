// cpu_common.h -- helpers shared by every SIMD clone of the CPU kernels.
//
// Everything on the hot path is `always_inline` and branch-free, so that when it is inlined into
// a function compiled for AVX2 / AVX-512 (see kernels.cpp) GCC vectorises it for that ISA.
// No torch headers: 16-bit float conversions are written out here.
#pragma once
#include <stdint.h>
#include <string.h>

#include "cdk_noise.h"

#define CDK_INLINE inline __attribute__((always_inline))

namespace cdk_cpu {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum Act : int { kNone = 0, kRelu = 1, kGelu = 2, kTanh = 3, kSigmoid = 4, kSoftplus = 5 };
enum Space : int { kProb = 0, kLogit = 1, kLogprob = 2 };

CDK_INLINE uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
CDK_INLINE float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

// ---- float16 <-> float32 (IEEE binary16; subnormals, inf and nan handled) ------------------
CDK_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t em = (uint32_t)(h & 0x7fffu);
  const uint32_t o = em << 13;                       // exponent/mantissa in float position
  const uint32_t exp = o & 0x0f800000u;              // the half exponent field, shifted
  const uint32_t normal = o + ((127u - 15u) << 23);  // rebias
  const uint32_t infnan = normal + ((128u - 16u) << 23);  // exponent all ones
  // subnormal (or zero): 2^-14 * m/1024, computed exactly as (magic + m) - magic in float
  const float sub = u2f(normal + (1u << 23)) - u2f(113u << 23);
  const uint32_t r = (exp == 0x0f800000u) ? infnan : (exp == 0u) ? f2u(sub) : normal;
  return u2f(r | sign);
}

CDK_INLINE uint16_t float_to_half(float fv) {
  uint32_t f = f2u(fv);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  // >= 65520 (rounds to inf) or inf/nan
  const uint32_t big = (f > 0x7f800000u) ? 0x7e00u : 0x7c00u;
  // subnormal/zero result: let the FPU round (to nearest even) by adding a magic number
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const uint32_t sub = f2u(u2f(f) + u2f(denorm_magic)) - denorm_magic;
  // normal: rebias and round to nearest even
  const uint32_t mant_odd = (f >> 13) & 1u;
  const uint32_t nrm = (f + ((uint32_t)(15 - 127) << 23) + 0xfffu + mant_odd) >> 13;
  const uint32_t o = (f >= ((127u + 16u) << 23)) ? big : (f < (113u << 23)) ? sub : nrm;
  return (uint16_t)(o | (sign >> 16));
}

// ---- bfloat16 <-> float32 -----------------------------------------------------------------
CDK_INLINE float bf16_to_float(uint16_t h) { return u2f((uint32_t)h << 16); }
CDK_INLINE uint16_t float_to_bf16(float fv) {
  const uint32_t f = f2u(fv);
  const uint32_t rne = (f + 0x7fffu + ((f >> 16) & 1u)) >> 16;
  const uint32_t nan = (f >> 16) | 0x40u;  // quiet nan, keep sign
  return (uint16_t)(((f & 0x7fffffffu) > 0x7f800000u) ? nan : rne);
}

// Element access by dtype tag.
// SIXTEEN: the data use the 16-bit noise stream (docs/noise.md 3b); round(v) is v rounded to
// the dtype and widened back (the 16-bit stream's element as the kernels compute with it).
struct F32 {
  using T = float;
  static constexpr bool SIXTEEN = false;
  static CDK_INLINE float ld(const T* p, int64_t i) { return p[i]; }
  static CDK_INLINE void st(T* p, int64_t i, float v) { p[i] = v; }
  static CDK_INLINE float round(float v) { return v; }
};
struct F16 {
  using T = uint16_t;
  static constexpr bool SIXTEEN = true;
  static CDK_INLINE float ld(const T* p, int64_t i) { return half_to_float(p[i]); }
  static CDK_INLINE void st(T* p, int64_t i, float v) { p[i] = float_to_half(v); }
  static CDK_INLINE float round(float v) { return half_to_float(float_to_half(v)); }
};
struct BF16 {
  using T = uint16_t;
  static constexpr bool SIXTEEN = true;
  static CDK_INLINE float ld(const T* p, int64_t i) { return bf16_to_float(p[i]); }
  static CDK_INLINE void st(T* p, int64_t i, float v) { p[i] = float_to_bf16(v); }
  static CDK_INLINE float round(float v) { return bf16_to_float(float_to_bf16(v)); }
};

// ---- float32 math, vectorisable ------------------------------------------------------------
// exp(x), ~1 ulp for x in [-87.3, 88.7]; below that it returns 0, above it is clamped to
// exp(88.72) ~ 3.4e38 (never inf, which keeps the callers' formulas nan-free). nan -> nan.
CDK_INLINE float exp_f(float xin) {
  float x = xin;
  x = x < -87.33654f ? -87.33654f : x;
  x = x > 88.72283f ? 88.72283f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: round to nearest integer
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  float r = x - n * 6.93145751953125e-1f;  // ln2 hi
  r = r - n * 1.42860682030941723212e-6f;  // ln2 lo
  // exp(r) on |r| <= ln2/2: degree-6 polynomial (cephes expf)
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // scale by 2^n, n in [-126, 128]: split in two factors so n = 128 and n = -126 both work
  const int32_t ni = (int32_t)n;
  const int32_t n1 = ni >> 1, n2 = ni - n1;
  const float r2 = p * u2f((uint32_t)(n1 + 127) << 23) * u2f((uint32_t)(n2 + 127) << 23);
  return xin < -87.33654f ? 0.0f : r2;  // underflow (and exp(-inf)) gives exactly 0
}

// natural log, about 1 ulp: the spec header's log for positive normal floats (its bit tricks
// give a finite garbage value for nan, inf, 0 and subnormals, so those are handled here: a nan
// sum of exponentials must stay nan, not become 88).
CDK_INLINE float log_f(float x) {
  const bool sub = x < 1.17549435e-38f;  // subnormal (or zero/negative): scale by 2^24 first
  const float l = cdk::log_unit(sub ? x * 16777216.0f : x);
  const float r = sub ? l - 16.635532333438687f : l;  // 24 ln 2
  const float inf = __builtin_inff();
  return (x > 0.0f && x < inf) ? r : (x == 0.0f ? -inf : (x == inf ? inf : __builtin_nanf("")));
}

// log1p(e) for e in [0, 1]: log(u) corrected by the rounding error of u = 1 + e.
CDK_INLINE float log1p_01(float e) {
  const float u = 1.0f + e;
  const float d = u - 1.0f;
  const float l = log_f(u);
  return (d == 0.0f) ? e : l - (d - e) / u;
}

// erfc(|x|) with ~1.2e-7 relative error (Numerical Recipes' Chebyshev fit erfcc), for x >= 0.
CDK_INLINE float erfc_pos(float z) {
  const float t = 1.0f / (1.0f + 0.5f * z);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  return t * exp_f(-z * z + p);
}

// erf(x), within 1e-6 absolute (small |x| uses its Taylor polynomial for relative accuracy).
CDK_INLINE float erf_f(float x) {
  const float z = x < 0.0f ? -x : x;
  const float big = 1.0f - erfc_pos(z);
  // |x| < 0.5: erf(x) = 2/sqrt(pi) * (x - x^3/3 + x^5/10 - x^7/42 + x^9/216 - x^11/1320)
  const float s = z * z;
  float p = -1.0f / 1320.0f;
  p = p * s + 1.0f / 216.0f;
  p = p * s - 1.0f / 42.0f;
  p = p * s + 1.0f / 10.0f;
  p = p * s - 1.0f / 3.0f;
  p = p * s + 1.0f;
  const float small = 1.12837916709551257f * z * p;
  const float r = z < 0.5f ? small : big;
  return x < 0.0f ? -r : r;
}

// Phi(z) = 0.5 * erfc(-z / sqrt 2): the standard normal cdf, relative accuracy in both tails.
CDK_INLINE float norm_cdf(float z) {
  const float a = (z < 0.0f ? -z : z) * 0.70710678118654752f;
  const float h = 0.5f * erfc_pos(a);
  return z < 0.0f ? h : 1.0f - h;
}

CDK_INLINE float tanh_f(float x) {
  const float z = x < 0.0f ? -x : x;
  // |x| < 0.625: cephes tanhf polynomial; else 1 - 2/(exp(2|x|) + 1)
  const float s = z * z;
  float p = -5.70498872745e-3f;
  p = p * s + 2.06390887954e-2f;
  p = p * s - 5.37397155531e-2f;
  p = p * s + 1.33314422036e-1f;
  p = p * s - 3.33332819422e-1f;
  const float small = p * s * z + z;
  const float large = 1.0f - 2.0f / (exp_f(2.0f * z) + 1.0f);
  const float r = z < 0.625f ? small : large;
  return x < 0.0f ? -r : r;
}

CDK_INLINE float sigmoid_f(float x) {
  const float e = exp_f(x < 0.0f ? x : -x);  // exp(-|x|) in (0, 1]
  const float inv = 1.0f / (1.0f + e);
  return x < 0.0f ? e * inv : inv;
}

template <int ACT>
CDK_INLINE float act_fwd(float z) {
  if (ACT == kNone) return z;
  if (ACT == kRelu) return z < 0.0f ? 0.0f : z;  // keeps nan, like clamp_min
  if (ACT == kGelu) return z * norm_cdf(z);
  if (ACT == kTanh) return tanh_f(z);
  if (ACT == kSigmoid) return sigmoid_f(z);
  // softplus: max(z,0) + log1p(exp(-|z|))
  const float e = exp_f(z < 0.0f ? z : -z);
  return (z > 0.0f ? z : 0.0f) + log1p_01(e);
}

template <int ACT>
CDK_INLINE float act_grad(float z) {
  if (ACT == kNone) return 1.0f;
  if (ACT == kRelu) return z > 0.0f ? 1.0f : 0.0f;
  if (ACT == kGelu) return norm_cdf(z) + z * (exp_f(-0.5f * z * z) * 0.398942280401432678f);
  if (ACT == kTanh) {
    const float t = tanh_f(z);
    return 1.0f - t * t;
  }
  if (ACT == kSigmoid) {
    const float s = sigmoid_f(z);
    return s * (1.0f - s);
  }
  return sigmoid_f(z);  // softplus
}

// ---- arguments -----------------------------------------------------------------------------
struct PointArgs {
  int dtype = kF32;
  int act = kNone;
  // data (flat, n elements)
  const void* x = nullptr;
  const void* f = nullptr;
  void* y = nullptr;
  const void* gy = nullptr;
  const void* yv = nullptr;  // forward output (relu backward mask)
  void* gx = nullptr;
  void* gf = nullptr;
  bool want_gsigma = false;
  // parameters
  float dt = 0.0f;
  float sqrt_dt = 0.0f;
  float noise_scale = 0.0f;   // cd_step, scalar sigma: sigma_value * sqrt(dt) (rounded once)
  const float* sigma = nullptr;
  float sigma_value = 0.0f;
  int64_t C = 1, chan_stride = 1;
  int64_t samples = 1;
  uint64_t seed = 0, offset = 0;
  uint32_t sample = 0;
  // std-scaled step (z = x + dt*f): moments are of z - zshift; backward writes
  // grad_x = gy + za*(z - zmean) + zb (gy may be null: 0), grad_f = dt*grad_x
  float zshift = 0.0f, zmean = 0.0f, za = 0.0f, zb = 0.0f;
  // std_gsum (float32 only): a tile whose max |y|/s (s: the noise scale) is below y_guard
  // reads eps back from the output, eps = (y - z) / s; other tiles (and y_guard = 0: all)
  // regenerate it (kernels_impl.h)
  float y_guard = 0.0f;
};

struct EnsArgs {
  int dtype = kF32;
  int space = kProb;
  int64_t K = 1, B = 1, C = 1;
  const void* inp = nullptr;
  void* out = nullptr;
  const void* gout = nullptr;
  const void* outv = nullptr;
  void* gin = nullptr;
};

// Signatures of the per-ISA kernels. Element ranges [begin, end) start at a multiple of 4.
// `acc` is a per-thread double[C] that grad_sigma sums are added to; `scratch` is per-thread
// float storage of at least 5*Cp + K floats, Cp = C rounded up to 16 (ensemble).
struct KernelTable {
  const char* name;
  void (*philox_words)(int32_t* out, int64_t b0, int64_t b1, uint64_t seed, uint64_t offset,
                       uint32_t sample);
  void (*uniform)(float* out, int64_t begin, int64_t end, uint64_t seed, uint64_t offset,
                  uint32_t sample);
  void (*normal)(void* out, int dtype, int64_t begin, int64_t end, uint64_t seed,
                 uint64_t offset, uint32_t sample);
  void (*cd_step_fwd)(const PointArgs& a, int64_t begin, int64_t end);
  void (*cd_step_bwd)(const PointArgs& a, int64_t begin, int64_t end, double* acc);
  void (*cd_smooth_fwd)(const PointArgs& a, int64_t begin, int64_t end);
  void (*cd_smooth_bwd)(const PointArgs& a, int64_t begin, int64_t end, double* acc);
  void (*ens_fwd)(const EnsArgs& a, int64_t b0, int64_t b1, float* scratch);
  void (*ens_bwd)(const EnsArgs& a, int64_t b0, int64_t b1, float* scratch);
  // acc[0] += sum (z - zshift), acc[1] += sum (z - zshift)^2 over [begin, end)
  void (*z_moments)(const PointArgs& a, int64_t begin, int64_t end, double* acc);
  void (*z_std_bwd)(const PointArgs& a, int64_t begin, int64_t end);
  // acc[c] += sum over channel c of gy * eps, the std step's noise (y_guard above)
  void (*std_gsum)(const PointArgs& a, int64_t begin, int64_t end, double* acc);
  // out[2i], out[2i+1] = the 16-bit stream's float32 normals of word w[i], before the 16-bit
  // rounding (what the kernels compute; tests check them against the float64 formulas)
  void (*normals16_of_words)(const uint32_t* w, float* out, int64_t n);
};

}  // namespace cdk_cpu
