// fast_noise.cuh -- the float32 stream's normals with fast transcendentals, for Monte-Carlo
// averaging (cd_smooth). docs/noise.md section 3c states the contract and the error bound.
//
// cd_smooth averages K samples of act(x + s*eps); what matters there is the distribution of
// eps, not its last bits, and the accurate Box-Muller of cdk_noise.h (about 90 instructions per
// word pair, IEEE division and square root) makes the K-sample loop issue-bound on a GPU. This
// one uses the same words and the same uniforms, so it is the same stream to within
//   |eps_fast - eps| <= 2^-18 * r        (r = sqrt(-2 ln U(wa)) <= 5.77, so <= 2.2e-5)
// on the GPU, where it uses MUFU.LG2 / MUFU.SQRT / MUFU.SIN / MUFU.COS (about 22 instructions
// per pair). The budget: angle error <= 1e-6 (sin/cos.approx, 2^-20.9 absolute on [-pi, pi],
// plus the rounding of the argument), radius error <= 1.5e-6 relative (lg2.approx: 2^-22
// absolute, so log U near 1, i.e. d = 1 - U < 1/16, comes from a 5-term series of
// -log(1 - d) instead: relative error < 2e-7; sqrt.approx 2^-23 relative).
// On the host (the CUDA emulator) the same formulas run with libm's float log2/sqrt/sin/cos in
// place of the hardware instructions: that checks the bit tricks, the series, the branch and
// the signs against the oracle; only a GPU run checks the hardware error against the bound.
#pragma once
#include <cmath>

#include "../cdk_noise.h"

namespace cdk {

CDK_HD void box_muller_fast(uint32_t wa, uint32_t wb, float* out_cos, float* out_sin) {
  // U(w) = (2m+1) 2^-24 with m = w >> 9, built on the bits: (1 + m 2^-23) - (1 - 2^-24), exact.
  const float one_minus_ulp = 0.999999940395355224609375f;  // 1 - 2^-24
  const float u = bits_to_float(0x3F800000u | (wa >> 9)) - one_minus_ulp;
  // d = 1 - U(wa) = U(~wa), exact: the complement's mantissa is 2^23 - 1 - m.
  const float d = bits_to_float(0x3F800000u | ((~wa) >> 9)) - one_minus_ulp;
  // -ln U: for d < 1/16 the series d + d^2/2 + d^3/3 + d^4/4 + d^5/5 (relative error < 2e-7),
  // else -ln2 * log2(U) (an absolute log2 error of 2^-22 is < 3e-6 relative there).
  const float series = d * (1.0f + d * (0.5f + d * (0.333333343f + d * (0.25f + d * 0.2f))));
#if defined(__CUDA_ARCH__)
  const float lg = __log2f(u);
#else
  const float lg = std::log2(u);
#endif
  const float t = 2.0f * (d < 0.0625f ? series : lg * -0.693147182f);
  // The angle as a = U(wb) - 1/2 in (-1/2, 1/2) (exact), where sin/cos.approx are most
  // accurate: cos(2 pi U) = -cos(2 pi a), sin(2 pi U) = -sin(2 pi a); the sign goes into r.
  const float a = (bits_to_float(0x3F800000u | (wb >> 9)) - 1.5f) + 5.9604644775390625e-08f;
  const float x = a * 6.28318530717958647692f;
  float r, sn, cs;
#if defined(__CUDA_ARCH__)
  asm("sqrt.approx.f32 %0, %1;" : "=f"(r) : "f"(t));
  __sincosf(x, &sn, &cs);
#else
  r = std::sqrt(t);
  sn = std::sin(x);
  cs = std::cos(x);
#endif
  *out_cos = -r * cs;
  *out_sin = -r * sn;
}

CDK_HD Normals4 keyed_normals_fast(const PhiloxKeys& K, uint64_t block, uint32_t sample) {
  const Words4 w = keyed_words(K, block, sample);
  Normals4 n;
  box_muller_fast(w.w0, w.w1, &n.n0, &n.n1);
  box_muller_fast(w.w2, w.w3, &n.n2, &n.n3);
  return n;
}

}  // namespace cdk
