// cdk_noise.h -- the cdkernels noise stream (docs/noise.md), written once for C++ and CUDA.
//
// Everything here is header-only, branch-free and uses only float32 arithmetic on the hot path,
// so the same code compiles for the host (where GCC auto-vectorises it) and for the device.
// The polynomial log/sin/cos below are accurate to about 1 ulp on the ranges the spec uses;
// we ship our own instead of calling libm so that CPU (vectorised) and GPU give the same
// numbers, and so the CPU loop vectorises without libmvec.
#pragma once
#include <stdint.h>
#if defined(CDK_EMULATE)
#include <cmath>
#endif

#if defined(__CUDACC__)
#define CDK_HD __host__ __device__ __forceinline__
#else
#define CDK_HD inline __attribute__((always_inline))
#endif

namespace cdk {

struct Words4 { uint32_t w0, w1, w2, w3; };
struct Normals4 { float n0, n1, n2, n3; };

CDK_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
  return (uint32_t)(((uint64_t)a * (uint64_t)b) >> 32);
}

// One 32x32 -> 64 product, both halves taken from it: a single IMAD.WIDE.U32 on the GPU (a
// separate hi and lo multiply would cost two), one MUL/VPMULUDQ on the CPU.
CDK_HD void mul_hilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = (uint64_t)a * (uint64_t)b;
  *hi = (uint32_t)(p >> 32);
  *lo = (uint32_t)p;
}

// The 10 round keys of a seed. Kernels build them once, before their grid-stride loop, and pass
// them to philox_keyed(): a Philox call then costs two wide multiplies and two 3-input XORs per
// round. On the device each key goes through an empty asm, so ptxas cannot re-materialise it
// from the seed (two adds per round) inside the loop.
struct PhiloxKeys { uint32_t k0[10], k1[10]; };

CDK_HD PhiloxKeys philox_keys(uint64_t seed) {
  PhiloxKeys K;
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
#if defined(__CUDA_ARCH__)
    asm("" : "+r"(k0), "+r"(k1));
#endif
    K.k0[r] = k0;
    K.k1[r] = k1;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return K;
}

// Philox4x32-10 on counter (c0,c1,c2,c3) with precomputed round keys.
CDK_HD Words4 philox_keyed(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                           const PhiloxKeys& K) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mul_hilo(M0, c0, &hi0, &lo0);
    mul_hilo(M1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ K.k0[round];
    const uint32_t n2 = hi0 ^ c3 ^ K.k1[round];
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
  }
  return Words4{c0, c1, c2, c3};
}

// Philox4x32-10 on counter (c0,c1,c2,c3) with key (k0,k1).
CDK_HD Words4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                            uint32_t k0, uint32_t k1) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  const uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    // (the CPU kernels call this one; the GPU kernels use philox_keyed)
    const uint32_t hi0 = mulhi32(M0, c0), lo0 = M0 * c0;
    const uint32_t hi1 = mulhi32(M1, c2), lo1 = M1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    k0 += W0; k1 += W1;
  }
  return Words4{c0, c1, c2, c3};
}

// The words of block `block` (64-bit) of stream (seed, sample).
CDK_HD Words4 stream_words(uint64_t seed, uint64_t block, uint32_t sample) {
  return philox4x32_10((uint32_t)block, (uint32_t)(block >> 32), sample, 0u,
                       (uint32_t)seed, (uint32_t)(seed >> 32));
}

// U(w) = (2*(w>>9)+1) * 2^-24: odd multiples of 2^-24, exact in float32.
CDK_HD float word_to_uniform(uint32_t w) {
  return (float)((int32_t)(((w >> 9) << 1) | 1u)) * 5.9604644775390625e-08f;  // 2^-24
}

// -- the float32 arithmetic of the normals ----------------------------------------------------
// Every product and sum below is spelled out with these macros, so each build computes a
// pinned sequence of roundings (docs/noise.md section 3):
//   GPU (nvcc) and the CUDA host emulator (CDK_EMULATE): CDK_FMA is a fused multiply-add (one
//     rounding; FFMA / std::fma), every other product and sum is rounded on its own
//     (__fmul_rn / __fadd_rn: nvcc may not contract them). The emulator therefore validates
//     exactly the GPU's arithmetic.
//   CPU (g++ -ffp-contract=off): CDK_FMA is __builtin_fmaf, one rounding as on the GPU, so the
//     CPU normals equal the CUDA build's bit for bit. The AVX2/AVX-512 clones turn it into FMA
//     instructions (vectorised); the baseline clone calls the C library's fmaf (same bits,
//     scalar and slow: only CPUs without AVX2 run it).
// Both stay within the spec's 4 ulp of the float64 oracle (tests/test_noise.py,
// tests/test_cuda_emulated.py).
#if defined(__CUDA_ARCH__)
#define CDK_FMA(a, b, c) __fmaf_rn((a), (b), (c))
#define CDK_MUL(a, b) __fmul_rn((a), (b))
#define CDK_ADD(a, b) __fadd_rn((a), (b))
#define CDK_SUB(a, b) __fsub_rn((a), (b))
#elif defined(CDK_EMULATE)
#define CDK_FMA(a, b, c) std::fma((float)(a), (float)(b), (float)(c))
#define CDK_MUL(a, b) ((a) * (b))
#define CDK_ADD(a, b) ((a) + (b))
#define CDK_SUB(a, b) ((a) - (b))
#else
#define CDK_FMA(a, b, c) __builtin_fmaf((a), (b), (c))
#define CDK_MUL(a, b) ((a) * (b))
#define CDK_ADD(a, b) ((a) + (b))
#define CDK_SUB(a, b) ((a) - (b))
#endif

// Natural log for x in [2^-24, 1], about 1 ulp. x = m * 2^e with m in [sqrt(1/2), sqrt(2)),
// log(m) = 2 atanh(s), s = (m-1)/(m+1). m-1 is exact, so the result stays accurate near x=1.
CDK_HD float log_unit(float x) {
  uint32_t bits;
#if defined(__CUDACC__) && defined(__CUDA_ARCH__)
  bits = __float_as_uint(x);
#else
  __builtin_memcpy(&bits, &x, 4);
#endif
  // Shift the mantissa into [sqrt(1/2), sqrt(2)): add (1 - sqrt(1/2)) in mantissa units.
  const uint32_t adj = bits + (0x3f800000u - 0x3f3504f3u);
  const int32_t e = (int32_t)(adj >> 23) - 127;
  const uint32_t mbits = (adj & 0x007fffffu) + 0x3f3504f3u;
  float m;
#if defined(__CUDACC__) && defined(__CUDA_ARCH__)
  m = __uint_as_float(mbits);
#else
  __builtin_memcpy(&m, &mbits, 4);
#endif
  const float f = CDK_SUB(m, 1.0f);
  const float s = f / CDK_ADD(2.0f, f);  // IEEE division on every build
  const float z = CDK_MUL(s, s);
  const float w = CDK_MUL(z, z);
  // fdlibm logf's polynomial for (log(m) - f + f^2/2)/s, split into odd/even parts for ILP.
  const float t1 =
      CDK_MUL(w, CDK_FMA(w, CDK_FMA(w, 1.5313838422e-01f, 2.2222198546e-01f), 4.0000000596e-01f));
  const float t2 = CDK_MUL(
      z, CDK_FMA(w, CDK_FMA(w, CDK_FMA(w, 1.4798198640e-01f, 1.8183572590e-01f),
                            2.8571429849e-01f),
                 6.6666668653e-01f));
  const float R = CDK_ADD(t1, t2);
  const float hfsq = CDK_MUL(CDK_MUL(0.5f, f), f);
  const float ef = (float)e;
  const float inner = CDK_FMA(s, CDK_ADD(hfsq, R), CDK_MUL(ef, 9.0580006145e-06f));
  return CDK_FMA(ef, 6.9313812256e-01f, -CDK_SUB(CDK_SUB(hfsq, inner), f));
}

CDK_HD float bits_to_float(uint32_t b) {
#if defined(__CUDACC__) && defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  __builtin_memcpy(&f, &b, 4);
  return f;
#endif
}
CDK_HD uint32_t float_to_bits(float f) {
#if defined(__CUDACC__) && defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  __builtin_memcpy(&b, &f, 4);
  return b;
#endif
}

// sin and cos of x for |x| <= pi/4 (cephes sinf/cosf minimax polynomials), about 1 ulp.
CDK_HD float sin_small(float x) {
  const float z = CDK_MUL(x, x);
  const float p = CDK_FMA(z, CDK_FMA(z, -1.9515295891e-4f, 8.3321608736e-3f), -1.6666654611e-1f);
  return CDK_FMA(CDK_MUL(x, z), p, x);
}
CDK_HD float cos_small(float x) {
  const float z = CDK_MUL(x, x);
  const float p = CDK_FMA(z, CDK_FMA(z, 2.443315711809948e-5f, -1.388731625493765e-3f),
                          4.166664568298827e-2f);
  return CDK_ADD(CDK_FMA(-0.5f, z, 1.0f), CDK_MUL(CDK_MUL(z, z), p));
}

// Box-Muller of one word pair: (r cos 2pi U(wb), r sin 2pi U(wb)), r = sqrt(-2 ln U(wa)).
CDK_HD void box_muller_u(float ua, float ub, float* out_cos, float* out_sin) {
#if defined(__CUDACC__) && defined(__CUDA_ARCH__)
  const float r = sqrtf(CDK_MUL(-2.0f, log_unit(ua)));  // IEEE sqrt (nvcc -prec-sqrt=true)
#else
  const float r = __builtin_sqrtf(CDK_MUL(-2.0f, log_unit(ua)));
#endif
  // Quarter-turn reduction (exact): q = round(4u) in 0..4, t = u - q/4 in [-1/8, 1/8].
  const int32_t q = (int32_t)CDK_FMA(4.0f, ub, 0.5f);  // 4u exact: one rounding either way
  const float t = CDK_FMA(-0.25f, (float)q, ub);         // exact
  const float x = CDK_MUL(6.28318530717958647692f, t);
  const float s = sin_small(x), c = cos_small(x);
  // rotate (c, s) by q quarter turns: 0:(c,s) 1:(-s,c) 2:(-c,-s) 3:(s,-c), as a swap when q is
  // odd and two sign flips (exact; two selects and two xors instead of six selects)
  const uint32_t qu = (uint32_t)q;
  const bool odd = (qu & 1u) != 0u;
  const float a = odd ? s : c, b = odd ? c : s;
  const uint32_t flip_c = ((qu + 1u) & 2u) << 30;  // q mod 4 in {1, 2}
  const uint32_t flip_s = (qu & 2u) << 30;         // q mod 4 in {2, 3}
  const float cr = bits_to_float(float_to_bits(a) ^ flip_c);
  const float sr = bits_to_float(float_to_bits(b) ^ flip_s);
  *out_cos = CDK_MUL(r, cr);
  *out_sin = CDK_MUL(r, sr);
}

CDK_HD void box_muller(uint32_t wa, uint32_t wb, float* out_cos, float* out_sin) {
  box_muller_u(word_to_uniform(wa), word_to_uniform(wb), out_cos, out_sin);
}

CDK_HD Normals4 words_to_normals(Words4 w) {
  Normals4 n;
  box_muller(w.w0, w.w1, &n.n0, &n.n1);
  box_muller(w.w2, w.w3, &n.n2, &n.n3);
  return n;
}

// The four normals of block `block` of stream (seed, sample): stream elements 4*b .. 4*b+3
// (relative to the stream's offset).
CDK_HD Normals4 stream_normals(uint64_t seed, uint64_t block, uint32_t sample) {
  return words_to_normals(stream_words(seed, block, sample));
}

// The same with the seed's round keys precomputed (philox_keys).
CDK_HD Words4 keyed_words(const PhiloxKeys& K, uint64_t block, uint32_t sample) {
  return philox_keyed((uint32_t)block, (uint32_t)(block >> 32), sample, 0u, K);
}
CDK_HD Normals4 keyed_normals(const PhiloxKeys& K, uint64_t block, uint32_t sample) {
  return words_to_normals(keyed_words(K, block, sample));
}


// -- the 16-bit stream (docs/noise.md section 3b): eight normals per Philox call -------------


// 1 + h * 2^-16 for a 16-bit h, built on the bits (no int->float conversion, which is a
// quarter-rate instruction on the GPU). Subtracting a constant then gives U16 exactly.
CDK_HD float one_plus_h(uint32_t h16) { return bits_to_float(0x3F800000u | (h16 << 7)); }

// U16(h) = (2h+1) * 2^-17 of the low (radius) and high (angle) halves of a word: exact.
CDK_HD float u16_radius(uint32_t w) { return one_plus_h(w & 0xFFFFu) - 0.99999237060546875f; }
CDK_HD float u16_angle(uint32_t w) { return one_plus_h(w >> 16) - 0.99999237060546875f; }

// The two float32 normals of one word, before the rounding to 16 bits:
//   (r cos 2pi U16(ha), r sin 2pi U16(ha)),  r = sqrt(-2 ln U16(hr)).
// GPU: hardware approximations (MUFU.LG2, MUFU.SQRT, MUFU.SIN/COS: about 13 instructions per
// word), within the spec's 2^-14 + 2^-16 |eps| (docs/noise.md 3b). Each half is spliced under
// the bits of 1.0f with one byte permute, v = 1 + h * 2^-23, and scaled by one FMA: the radius
// uniform U16(hr) = 128 v - (128 - 2^-17) exactly, the angle a = 128 v - 128.5 = ha 2^-16 - 1/2
// exactly, in [-1/2, 1/2) where the hardware sin/cos are most accurate; x = 2 pi (a + 2^-17) is
// then the angle minus a half turn, which is folded into the sign of r. The arguments of lg2
// (>= 2^-17) and sqrt (>= 1.5e-5) are never subnormal, so the .ftz forms (no subnormal
// fix-ups) compute the same values. Host (the CUDA emulator): the accurate float32 Box-Muller of
// the 32-bit stream on these uniforms (1-2 ulp). The CPU backend's kernels do not call this: they
// use word_to_normals16_fast (cpu/kernels_impl.h), division-free polynomials within 1.2e-6 r.
CDK_HD void word_to_normals16(uint32_t w, float* out_cos, float* out_sin) {
#if defined(__CUDA_ARCH__)
  const float vr = __uint_as_float(__byte_perm(w, 0x3F800000u, 0x7610));  // 1 + hr 2^-23
  const float va = __uint_as_float(__byte_perm(w, 0x3F800000u, 0x7632));  // 1 + ha 2^-23
  const float ur = __fmaf_rn(vr, 128.0f, -127.99999237060546875f);        // U16(hr), exact
  const float a = __fmaf_rn(va, 128.0f, -128.5f);                         // ha 2^-16 - 1/2
  const float x = __fmaf_rn(a, 6.28318530717958647692f, 4.79368996e-5f);  // 2 pi (a + 2^-17)
  float l2, r, sn, cs;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(l2) : "f"(ur));
  const float t = __fmul_rn(l2, -1.38629436111989061883f);  // -2 ln ur >= 1.5e-5
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(t));
  asm("sin.approx.ftz.f32 %0, %1;" : "=f"(sn) : "f"(x));
  asm("cos.approx.ftz.f32 %0, %1;" : "=f"(cs) : "f"(x));
  *out_cos = __fmul_rn(-r, cs);
  *out_sin = __fmul_rn(-r, sn);
#else
  box_muller_u(u16_radius(w), u16_angle(w), out_cos, out_sin);
#endif
}

// The eight float32 normals (lanes 0..7, before the 16-bit rounding) of a block's words.
struct Normals8 { float n[8]; };
CDK_HD Normals8 words_to_normals16(Words4 w) {
  Normals8 r;
  word_to_normals16(w.w0, &r.n[0], &r.n[1]);
  word_to_normals16(w.w1, &r.n[2], &r.n[3]);
  word_to_normals16(w.w2, &r.n[4], &r.n[5]);
  word_to_normals16(w.w3, &r.n[6], &r.n[7]);
  return r;
}
CDK_HD Normals8 stream_normals16(uint64_t seed, uint64_t block, uint32_t sample) {
  return words_to_normals16(stream_words(seed, block, sample));
}
CDK_HD Normals8 keyed_normals16(const PhiloxKeys& K, uint64_t block, uint32_t sample) {
  return words_to_normals16(keyed_words(K, block, sample));
}

}  // namespace cdk
