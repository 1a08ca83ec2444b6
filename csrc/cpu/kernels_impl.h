// kernels_impl.h -- the CPU kernels, written once and compiled once per SIMD level.
//
// NO include guard on purpose: kernels.cpp includes this file several times, each time inside
// `namespace CDK_ISA_NS { ... }` and (on x86) inside `#pragma GCC target(...)`, so every
// function here is cloned for baseline / AVX2 / AVX-512. The header helpers (cdk_noise.h,
// cpu_common.h) are always_inline, so they are compiled with the clone's ISA too.
//
// Work is done in tiles of TILE elements (TILE/4 Philox blocks): the tile's normals are made in
// one vectorised loop into a stack buffer, then one vectorised element-wise loop does the op.
// Tiles start at multiples of 8 elements relative to the op's first element (whole Philox
// blocks of both streams: 4 elements in the float32 stream, 8 in the 16-bit one).

#ifndef CDK_ISA_NS
#error "define CDK_ISA_NS before including kernels_impl.h"
#endif

namespace CDK_ISA_NS {

using namespace cdk_cpu;

constexpr int TILE = 512;

// -- noise ------------------------------------------------------------------------------------
// Philox words of blocks (lo0 + i, hi, sample, 0), i < nb, in structure-of-arrays form:
// w[j][i] is word j of block lo0 + i (the caller guarantees lo0 + nb - 1 does not wrap, and
// nb <= PHILOX_SOA). GCC vectorises the scalar round's 32x32->64 multiply by widening every lane
// to 64 bits and using vpmullq (3 uops, 15 cycles latency on AVX-512) or a 64-bit multiply
// emulation (AVX2), which made the rounds cost more than Box-Muller. Here the clones keep each
// word in the low half of a 64-bit lane and multiply with vpmuludq (one uop); integer
// arithmetic, so the words are bit-identical to cdk::philox4x32_10 (tests/test_noise.py,
// tests/test_cpu_simd.py).
constexpr int PHILOX_SOA = 128;


static void philox_soa(uint32_t (*__restrict w)[PHILOX_SOA], uint32_t lo0, uint32_t hi,
                       uint32_t sample, uint32_t k0, uint32_t k1, int nb) {
  int i = 0;
#if CDK_ISA_LEVEL == 2
  {
    // Each word of 8 blocks sits in the low halves of the 64-bit lanes of one register, two
    // registers per 16 blocks. vpmuludq reads only the low halves (what the high halves hold
    // does not matter), so a round is 2 vpmuludq + 2 vpshufd (the high product half moved
    // down) + 2 vpternlogd per 8 blocks: 12 instructions per 16 blocks instead of the 16 of
    // the packed form (16 lanes per register, whose hi/lo halves need two blends), split evenly
    // between ports 0 and 5.
    // Rounds 1 and 2 are peeled: only c0 differs between blocks at the start, so round 1's
    // second product (sample * M1) and round 2's first (of round 1's c0 = hi(sample M1) ^ hi ^
    // k0) are the same for every block, computed once here: 2 products of 4 fewer per block.
    const __m512i M0 = _mm512_set1_epi32((int)0xD2511F53u), M1 = _mm512_set1_epi32((int)0xCD9E8D57u);
    const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i pack = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const uint64_t s1 = (uint64_t)sample * 0xCD9E8D57u;                 // round 1, mulhilo(M1, c2)
    const uint32_t r1c0 = (uint32_t)(s1 >> 32) ^ hi ^ k0, r1c1 = (uint32_t)s1;
    const uint32_t k0r2 = k0 + 0x9E3779B9u, k1r2 = k1 + 0xBB67AE85u;
    const uint64_t s0 = (uint64_t)r1c0 * 0xD2511F53u;                   // round 2, mulhilo(M0, c0)
    const __m512i r2x0 = _mm512_set1_epi32((int)(r1c1 ^ k0r2));         // c0'' = hi(c2' M1) ^ this
    const __m512i r2x2 = _mm512_set1_epi32((int)((uint32_t)(s0 >> 32) ^ k1r2));  // c2'' = c3' ^ this
    const __m512i r2c3 = _mm512_set1_epi32((int)(uint32_t)s0);
    const __m512i k1v = _mm512_set1_epi32((int)k1);
    for (; i + 16 <= nb; i += 16) {
      const __m512i base = _mm512_set1_epi64((long long)(lo0 + (uint32_t)i));
      const __m512i c0a0 = _mm512_add_epi64(base, lane);  // low halves: lo0 + i + j mod 2^32
      const __m512i c0b0 = _mm512_add_epi64(c0a0, _mm512_set1_epi64(8));
      // round 1: c0' (constant), c1' = lo(sample M1) (constant), c2' = hi(c0 M0) ^ k1, c3' = lo
      const __m512i p0a = _mm512_mul_epu32(c0a0, M0), p0b = _mm512_mul_epu32(c0b0, M0);
      const __m512i c2a1 = _mm512_xor_si512(_mm512_shuffle_epi32(p0a, (_MM_PERM_ENUM)0xF5), k1v);
      const __m512i c2b1 = _mm512_xor_si512(_mm512_shuffle_epi32(p0b, (_MM_PERM_ENUM)0xF5), k1v);
      // round 2: c0'' = hi(c2' M1) ^ c1' ^ key, c1'' = lo(c2' M1), c2'' = hi(c0' M0) ^ c3' ^ key,
      // c3'' = lo(c0' M0) (constant)
      const __m512i p1a = _mm512_mul_epu32(c2a1, M1), p1b = _mm512_mul_epu32(c2b1, M1);
      __m512i c0a = _mm512_xor_si512(_mm512_shuffle_epi32(p1a, (_MM_PERM_ENUM)0xF5), r2x0);
      __m512i c0b = _mm512_xor_si512(_mm512_shuffle_epi32(p1b, (_MM_PERM_ENUM)0xF5), r2x0);
      __m512i c1a = p1a, c1b = p1b;
      __m512i c2a = _mm512_xor_si512(p0a, r2x2), c2b = _mm512_xor_si512(p0b, r2x2);
      __m512i c3a = r2c3, c3b = r2c3;
      uint32_t a = k0r2 + 0x9E3779B9u, b = k1r2 + 0xBB67AE85u;
      for (int r = 2; r < 10; ++r) {
        const __m512i ka = _mm512_set1_epi32((int)a), kb = _mm512_set1_epi32((int)b);
        const __m512i q0a = _mm512_mul_epu32(c0a, M0), q1a = _mm512_mul_epu32(c2a, M1);
        const __m512i q0b = _mm512_mul_epu32(c0b, M0), q1b = _mm512_mul_epu32(c2b, M1);
        c0a = _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(q1a, (_MM_PERM_ENUM)0xF5), c1a, ka,
                                        0x96);  // hi1 ^ c1 ^ key, 3-way xor
        c2a = _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(q0a, (_MM_PERM_ENUM)0xF5), c3a, kb,
                                        0x96);
        c0b = _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(q1b, (_MM_PERM_ENUM)0xF5), c1b, ka,
                                        0x96);
        c2b = _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(q0b, (_MM_PERM_ENUM)0xF5), c3b, kb,
                                        0x96);
        c1a = q1a;  // lo1 in the low halves
        c3a = q0a;
        c1b = q1b;
        c3b = q0b;
        a += 0x9E3779B9u;
        b += 0xBB67AE85u;
      }
      _mm512_store_si512((void*)(w[0] + i), _mm512_permutex2var_epi32(c0a, pack, c0b));
      _mm512_store_si512((void*)(w[1] + i), _mm512_permutex2var_epi32(c1a, pack, c1b));
      _mm512_store_si512((void*)(w[2] + i), _mm512_permutex2var_epi32(c2a, pack, c2b));
      _mm512_store_si512((void*)(w[3] + i), _mm512_permutex2var_epi32(c3a, pack, c3b));
    }
  }
#elif CDK_ISA_LEVEL == 1
  {
    // As the AVX-512 loop above: words in the low halves of 64-bit lanes (4 blocks per
    // register, two registers per 8 blocks), rounds 1 and 2 peeled.
    const __m256i M0 = _mm256_set1_epi32((int)0xD2511F53u), M1 = _mm256_set1_epi32((int)0xCD9E8D57u);
    const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
    const __m256i lo_a = _mm256_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0);
    const __m256i lo_b = _mm256_setr_epi32(0, 0, 0, 0, 0, 2, 4, 6);
    const uint64_t s1 = (uint64_t)sample * 0xCD9E8D57u;
    const uint32_t r1c0 = (uint32_t)(s1 >> 32) ^ hi ^ k0, r1c1 = (uint32_t)s1;
    const uint32_t k0r2 = k0 + 0x9E3779B9u, k1r2 = k1 + 0xBB67AE85u;
    const uint64_t s0 = (uint64_t)r1c0 * 0xD2511F53u;
    const __m256i r2x0 = _mm256_set1_epi32((int)(r1c1 ^ k0r2));
    const __m256i r2x2 = _mm256_set1_epi32((int)((uint32_t)(s0 >> 32) ^ k1r2));
    const __m256i r2c3 = _mm256_set1_epi32((int)(uint32_t)s0);
    const __m256i k1v = _mm256_set1_epi32((int)k1);
    auto hi_down = [](__m256i p) { return _mm256_shuffle_epi32(p, 0xF5); };
    auto pack = [&](__m256i x, __m256i y) {
      return _mm256_blend_epi32(_mm256_permutevar8x32_epi32(x, lo_a),
                                _mm256_permutevar8x32_epi32(y, lo_b), 0xF0);
    };
    for (; i + 8 <= nb; i += 8) {
      const __m256i c0a0 = _mm256_add_epi64(_mm256_set1_epi64x((long long)(lo0 + (uint32_t)i)), lane);
      const __m256i c0b0 = _mm256_add_epi64(c0a0, _mm256_set1_epi64x(4));
      const __m256i p0a = _mm256_mul_epu32(c0a0, M0), p0b = _mm256_mul_epu32(c0b0, M0);
      const __m256i c2a1 = _mm256_xor_si256(hi_down(p0a), k1v);
      const __m256i c2b1 = _mm256_xor_si256(hi_down(p0b), k1v);
      const __m256i p1a = _mm256_mul_epu32(c2a1, M1), p1b = _mm256_mul_epu32(c2b1, M1);
      __m256i c0a = _mm256_xor_si256(hi_down(p1a), r2x0), c0b = _mm256_xor_si256(hi_down(p1b), r2x0);
      __m256i c1a = p1a, c1b = p1b;
      __m256i c2a = _mm256_xor_si256(p0a, r2x2), c2b = _mm256_xor_si256(p0b, r2x2);
      __m256i c3a = r2c3, c3b = r2c3;
      uint32_t a = k0r2 + 0x9E3779B9u, b = k1r2 + 0xBB67AE85u;
      for (int r = 2; r < 10; ++r) {
        const __m256i ka = _mm256_set1_epi32((int)a), kb = _mm256_set1_epi32((int)b);
        const __m256i q0a = _mm256_mul_epu32(c0a, M0), q1a = _mm256_mul_epu32(c2a, M1);
        const __m256i q0b = _mm256_mul_epu32(c0b, M0), q1b = _mm256_mul_epu32(c2b, M1);
        c0a = _mm256_xor_si256(_mm256_xor_si256(hi_down(q1a), c1a), ka);
        c2a = _mm256_xor_si256(_mm256_xor_si256(hi_down(q0a), c3a), kb);
        c0b = _mm256_xor_si256(_mm256_xor_si256(hi_down(q1b), c1b), ka);
        c2b = _mm256_xor_si256(_mm256_xor_si256(hi_down(q0b), c3b), kb);
        c1a = q1a;
        c3a = q0a;
        c1b = q1b;
        c3b = q0b;
        a += 0x9E3779B9u;
        b += 0xBB67AE85u;
      }
      _mm256_store_si256((__m256i*)(w[0] + i), pack(c0a, c0b));
      _mm256_store_si256((__m256i*)(w[1] + i), pack(c1a, c1b));
      _mm256_store_si256((__m256i*)(w[2] + i), pack(c2a, c2b));
      _mm256_store_si256((__m256i*)(w[3] + i), pack(c3a, c3b));
    }
  }
#endif
  for (; i < nb; ++i) {
    const cdk::Words4 v = cdk::philox4x32_10(lo0 + (uint32_t)i, hi, sample, 0u, k0, k1);
    w[0][i] = v.w0;
    w[1][i] = v.w1;
    w[2][i] = v.w2;
    w[3][i] = v.w3;
  }
}

// Calls body(w, i0, m) for the blocks (lo0 + i0 + i, hi), i < m, in chunks of PHILOX_SOA,
// with w holding their words (philox_soa layout). The caller guarantees lo0 + nb - 1 does not
// wrap.
template <class Body>
static inline void philox_chunks(uint32_t lo0, uint32_t hi, uint32_t sample, uint32_t k0,
                                 uint32_t k1, int nb, Body&& body) {
  alignas(64) uint32_t w[4][PHILOX_SOA];
  for (int i0 = 0; i0 < nb; i0 += PHILOX_SOA) {
    const int m = nb - i0 < PHILOX_SOA ? nb - i0 : PHILOX_SOA;
    philox_soa(w, lo0 + (uint32_t)i0, hi, sample, k0, k1, m);
    body(w, i0, m);
  }
}

// The float32 stream's normals of blocks (lo0 + i, hi), i < nb (no wrap inside).
static void normals_run(float* __restrict out, uint32_t lo0, uint32_t hi, uint32_t sample,
                        uint32_t k0, uint32_t k1, int nb) {
  philox_chunks(lo0, hi, sample, k0, k1, nb, [&](uint32_t (*w)[PHILOX_SOA], int i0, int m) {
    float* o = out + 4 * i0;
    for (int i = 0; i < m; ++i) {
      float n0, n1, n2, n3;
      cdk::box_muller(w[0][i], w[1][i], &n0, &n1);
      cdk::box_muller(w[2][i], w[3][i], &n2, &n3);
      o[4 * i + 0] = n0;
      o[4 * i + 1] = n1;
      o[4 * i + 2] = n2;
      o[4 * i + 3] = n3;
    }
  });
}

static void words_run(uint32_t* __restrict out, uint32_t lo0, uint32_t hi, uint32_t sample,
                      uint32_t k0, uint32_t k1, int nb) {
  philox_chunks(lo0, hi, sample, k0, k1, nb, [&](uint32_t (*w)[PHILOX_SOA], int i0, int m) {
    uint32_t* o = out + 4 * i0;
    for (int i = 0; i < m; ++i) {
      o[4 * i + 0] = w[0][i];
      o[4 * i + 1] = w[1][i];
      o[4 * i + 2] = w[2][i];
      o[4 * i + 3] = w[3][i];
    }
  });
}

// Number of blocks from lo0 before the low counter word wraps (capped at nb).
static inline int64_t blocks_before_wrap(uint32_t lo0, int64_t nb) {
  const uint64_t room = 0x100000000ull - (uint64_t)lo0;
  return (uint64_t)nb > room ? (int64_t)room : nb;
}

// run(out, lo0, hi, sample, k0, k1, n) over blocks block0 .. block0 + nb - 1 (64-bit block
// numbers, mod 2^64), split where the low counter word wraps; `per` outputs per block.
template <class Run, class T>
static inline void split_at_wrap(Run run, T* __restrict out, int per, uint64_t seed,
                                 uint64_t block0, int nb, uint32_t sample) {
  const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  const uint32_t lo0 = (uint32_t)block0, hi = (uint32_t)(block0 >> 32);
  const int first = (int)blocks_before_wrap(lo0, nb);
  run(out, lo0, hi, sample, k0, k1, first);
  if (first < nb) run(out + per * first, 0u, hi + 1u, sample, k0, k1, nb - first);
}

// The normals of blocks block0 .. block0 + nb - 1.
static void gen_normals(float* __restrict out, uint64_t seed, uint64_t block0, int nb,
                        uint32_t sample) {
  split_at_wrap(normals_run, out, 4, seed, block0, nb, sample);
}

// -- the float32 stream's normals with fast transcendentals (docs/noise.md 3c): cd_smooth only --
// cd_smooth averages K samples of act(x + s eps); its result depends on the distribution of eps,
// not on its last bits (3c), and at K = 8 its time is the noise. The accurate Box-Muller spends
// about a third of its time in log_unit's IEEE division and the IEEE square root (vdivps and
// vsqrtps, the slow divider unit). Here the same words and the same uniforms go through:
//   ln U = e ln2 + f P(f), U = (1 + f) 2^e with 1 + f in [sqrt(1/2), sqrt(2)) (f exact), P a
//     degree-6 fit of log1p(f)/f: relative error 1.5e-6 evaluated in float32 (no division);
//   r = sqrt(t), t = -2 ln U, by vsqrtps: exact, and alone (without the division) it keeps up
//     with the rest of the loop (rsqrt14 plus a Newton step measured 2-4 % slower, in noise);
//   the angle reduced by half turns (not the accurate angle's quarter turns), so the rotation
//     is a sign on r, with polynomials of one degree more (|error| <= 2.3e-7).
// So |eps_fast - eps| <= 1.2e-6 r (the log's 7.5e-7 r in r, the angle's 2.3e-7 r, roundings;
// measured 7.9e-7 r), inside 3c's bound of 2^-18 r = 3.8e-6 r
// (tests/test_cpu_simd.py::test_cd_smooth_fast_normals_within_the_3c_bound).
// Written one pair at a time: GCC's loop vectoriser turns normals_fast_lanes_run's loop over it
// into clean code at every SIMD level (a hand-written 16-lane version measured the same in
// AVX-512, and GCC split it into ymm halves with lane moves through the stack in AVX2).
// a*b + c, one rounding where the clone has FMA
static inline __attribute__((always_inline)) float smooth_fma(float a, float b, float c) {
#if CDK_ISA_LEVEL >= 1
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// a*b + c in the fast normals: TRUE_FMA, one rounding at every level (the C library's fmaf in
// the baseline clone, as CDK_FMA: the 16-bit stream, whose clones must agree bit for bit); else
// smooth_fma (cd_smooth, where the baseline clone may round twice)
template <bool TRUE_FMA>
static inline __attribute__((always_inline)) float fast_fma(float a, float b, float c) {
  return TRUE_FMA ? CDK_FMA(a, b, c) : smooth_fma(a, b, c);
}

// -2 ln U of the uniform U = n 2^-BITS (n odd, below 2^BITS, so exact in float32), without a
// division: ln U split as in cdk::log_unit (mantissa shifted into [sqrt(1/2), sqrt(2))), read
// off the float of n: the same mantissa, the exponent BITS higher. The exponent bias (127) and
// BITS come off in the same add, so e is one arithmetic shift of it (e in [-BITS, 0]). P is
// scaled by -2 (exact: a power of two), so t comes out of the last fma directly, the same float
// as -2 (e ln2 + f P(f)).
template <bool TRUE_FMA, unsigned BITS>
static inline __attribute__((always_inline)) float neg2_log_fast(uint32_t n) {
  const int32_t adj = (int32_t)(cdk::float_to_bits((float)(int32_t)n) +
                                (0x3f800000u - 0x3f3504f3u - ((127u + BITS) << 23)));
  const float e = (float)(adj >> 23);
  const float f = cdk::bits_to_float(((uint32_t)adj & 0x007fffffu) + 0x3f3504f3u) - 1.0f;  // exact
  float p = -0.24420224130153656f;
  p = fast_fma<TRUE_FMA>(p, f, 0.37563055753707886f);
  p = fast_fma<TRUE_FMA>(p, f, -0.4090922474861145f);
  p = fast_fma<TRUE_FMA>(p, f, 0.49793824553489685f);
  p = fast_fma<TRUE_FMA>(p, f, -0.6663208603858948f);
  p = fast_fma<TRUE_FMA>(p, f, 1.0000278949737549f);
  p = fast_fma<TRUE_FMA>(p, f, -2.0000016689300537f);
  return fast_fma<TRUE_FMA>(e, -1.3862943649291992f, f * p);
}

// (rs cos x, rs sin x) for x in [-pi/2, pi/2]: minimax polynomials (x^9 for sin, x^8 for cos),
// |error| <= 2.3e-7 over all 2^23 angles of the float32 stream, evaluated in float32.
template <bool TRUE_FMA>
static inline __attribute__((always_inline)) void rotate_fast(float x, float rs, float* out_cos,
                                                              float* out_sin) {
  const float z = x * x;
  float ps = fast_fma<TRUE_FMA>(z, 2.590494432297419e-06f, -0.00019800900190602988f);
  ps = fast_fma<TRUE_FMA>(ps, z, 0.008332899771630764f);
  ps = fast_fma<TRUE_FMA>(ps, z, -0.16666647791862488f);
  ps = fast_fma<TRUE_FMA>(ps, z, 1.0f);
  float pc = fast_fma<TRUE_FMA>(z, 2.315400524821598e-05f, -0.00138537073507905f);
  pc = fast_fma<TRUE_FMA>(pc, z, 0.04166358336806297f);
  pc = fast_fma<TRUE_FMA>(pc, z, -0.4999990463256836f);
  pc = fast_fma<TRUE_FMA>(pc, z, 0.9999999403953552f);
  *out_cos = rs * pc;
  *out_sin = rs * (x * ps);
}

static inline __attribute__((always_inline)) void box_muller_fast(uint32_t wa, uint32_t wb,
                                                                  float* out_cos,
                                                                  float* out_sin) {
  // U(w) 2^24 = 2 (w >> 9) + 1 = (w >> 8) | 1, an odd integer below 2^24
  const float r = __builtin_sqrtf(neg2_log_fast<false, 24>((wa >> 8) | 1u));  // t in (0, 33.3]
  // The angle reduced by half turns, in integers: with g = wb >> 9 (so U 2^24 = 2g + 1),
  // q = round(2U) = (g + 2^21) >> 22 and (U - q/2) 2^24 = 2d + 1 with d = g - q 2^22, exact; so
  // x = 2 pi (U - q/2) = fma(d, 2k, k), k = 2 pi 2^-24, one rounding of the exact product (the
  // same float as k (2d + 1)). x is in [-pi/2, pi/2], and (cos, sin)(2 pi U) =
  // (-1)^q (cos, sin)(x): the sign goes on r (bit 22 of g + 2^21 is q's parity). Unlike the
  // quarter-turn rotation of the accurate angle there is no swap or per-output sign.
  const uint32_t gb = wb >> 9, v = gb + (1u << 21);
  constexpr float k = 6.28318530717958647692f * 5.9604644775390625e-08f;
  const float x = smooth_fma((float)(int32_t)(gb - (v & 0xffc00000u)), 2.0f * k, k);
  const float rs = cdk::bits_to_float(cdk::float_to_bits(r) ^ ((v << 9) & 0x80000000u));
  rotate_fast<false>(x, rs, out_cos, out_sin);
}

// The 16-bit stream's pair of one word (docs/noise.md 3b) with the same fast transcendentals:
// the spec lets native backends approximate there (|error| <= 2^-14 + 2^-16 |eps| before the
// 16-bit rounding; the GPU builds use the hardware's), and 1.2e-6 r is 50x inside it (measured
// 7.3e-7 r over every radius half and angle half). Every multiply-add is a true FMA, so all
// clones compute the same bits: forward and backward agree whichever clone runs them. The
// uniforms are box_muller_fast's with 17 bits instead of 24:
//   radius: U16(hr) 2^17 = 2 hr + 1 (odd, below 2^17);
//   angle:  g = ha, q = round(2 U) = (g + 2^14) >> 15, (U - q/2) 2^17 = 2d + 1 with
//           d = g - q 2^15, x = fma(d, 2k, k), k = 2 pi 2^-17; q's parity is bit 15 of g + 2^14.
static inline __attribute__((always_inline)) void word_to_normals16_fast(uint32_t w,
                                                                         float* out_cos,
                                                                         float* out_sin) {
  const float r = __builtin_sqrtf(neg2_log_fast<true, 17>(((w << 1) & 0x1fffeu) | 1u));
  const uint32_t g = w >> 16, v = g + (1u << 14);
  constexpr float k = 6.28318530717958647692f * 7.62939453125e-06f;  // 2 pi 2^-17
  const float x = CDK_FMA((float)(int32_t)(g - (v & 0xffff8000u)), 2.0f * k, k);
  const float rs = cdk::bits_to_float(cdk::float_to_bits(r) ^ ((v << 16) & 0x80000000u));
  rotate_fast<true>(x, rs, out_cos, out_sin);
}

// As normals_run, with box_muller_fast, but written lane-major: out[j * PHILOX_SOA + i] is lane
// j of block lo0 + i (nb <= PHILOX_SOA). That is the order the vectorised loop computes them in;
// the element order (4 i + j) cost a 4 x 16 transpose per 64 normals on port 5 (8 vpermt2ps),
// while cd_smooth can put its tile into this order once per tile instead of once per sample.
static void normals_fast_lanes_run(float* __restrict out, uint32_t lo0, uint32_t hi,
                                   uint32_t sample, uint32_t k0, uint32_t k1, int nb) {
  philox_chunks(lo0, hi, sample, k0, k1, nb, [&](uint32_t (*w)[PHILOX_SOA], int, int m) {
    float* __restrict o0 = out;
    float* __restrict o1 = out + PHILOX_SOA;
    float* __restrict o2 = out + 2 * PHILOX_SOA;
    float* __restrict o3 = out + 3 * PHILOX_SOA;
    for (int i = 0; i < m; ++i) {
      box_muller_fast(w[0][i], w[1][i], &o0[i], &o1[i]);
      box_muller_fast(w[2][i], w[3][i], &o2[i], &o3[i]);
    }
  });
}

// The fast normals of blocks block0 .. block0 + nb - 1 (cd_smooth's samples, nb <= PHILOX_SOA),
// lane-major (normals_fast_lanes_run). An eps buffer in L1 costs no more than consuming the
// registers directly: a fused version measured the same (the loop is bound by ports 0 and 5,
// not by the loads and stores).
static void gen_normals_fast_lanes(float* __restrict out, uint64_t seed, uint64_t block0, int nb,
                                   uint32_t sample) {
  // (a wrap of the low counter word inside the tile continues at column `first`: per = 1)
  split_at_wrap(normals_fast_lanes_run, out, 1, seed, block0, nb, sample);
}

// cd_smooth's tiles in the lane order of gen_normals_fast_lanes: slot j * PHILOX_SOA + i holds
// element 4 i + j of the tile (len <= TILE elements; slots past len get 0).
static inline void tile_to_lanes(float* __restrict dst, const float* __restrict src, int len) {
  if (len == TILE) {
    for (int i = 0; i < PHILOX_SOA; ++i)
      for (int j = 0; j < 4; ++j) dst[j * PHILOX_SOA + i] = src[4 * i + j];
    return;
  }
  for (int i = 0; i < PHILOX_SOA; ++i)
    for (int j = 0; j < 4; ++j) dst[j * PHILOX_SOA + i] = 4 * i + j < len ? src[4 * i + j] : 0.0f;
}

static inline void tile_from_lanes(float* __restrict dst, const float* __restrict src, int len) {
  if (len == TILE) {
    for (int i = 0; i < PHILOX_SOA; ++i)
      for (int j = 0; j < 4; ++j) dst[4 * i + j] = src[j * PHILOX_SOA + i];
    return;
  }
  for (int e = 0; e < len; ++e) dst[e] = src[(e & 3) * PHILOX_SOA + (e >> 2)];
}

// The 16-bit stream (docs/noise.md 3b): the eight float32 normals per block, before the
// rounding to the dtype (gen_normals16 does it), for blocks (lo0 + i, hi), i < nb (no wrap
// inside, as normals_run).
static void normals16_run(float* __restrict out, uint32_t lo0, uint32_t hi, uint32_t sample,
                          uint32_t k0, uint32_t k1, int nb) {
  philox_chunks(lo0, hi, sample, k0, k1, nb, [&](uint32_t (*w)[PHILOX_SOA], int i0, int m) {
    // One word at a time (one Box-Muller chain per vectorised loop instead of four, which ran
    // out of the 32 vector registers), into lane-major rows, then one interleaving loop.
    alignas(64) float lanes[8][PHILOX_SOA];
    for (int j = 0; j < 4; ++j) {
      const uint32_t* __restrict wj = w[j];
      float* __restrict c = lanes[2 * j];
      float* __restrict s = lanes[2 * j + 1];
      for (int i = 0; i < m; ++i) word_to_normals16_fast(wj[i], &c[i], &s[i]);
    }
    float* __restrict o = out + 8 * i0;
    for (int i = 0; i < m; ++i)
      for (int l = 0; l < 8; ++l) o[8 * i + l] = lanes[l][i];
  });
}

template <class D>
static void gen_normals16(float* __restrict out, uint64_t seed, uint64_t block0, int nb,
                          uint32_t sample) {
  split_at_wrap(normals16_run, out, 8, seed, block0, nb, sample);
  // The rounding to the dtype in its own loop: it vectorises there (float16's conversion has
  // selects that would keep the Box-Muller loop above scalar).
  for (int i = 0; i < 8 * nb; ++i) out[i] = D::round(out[i]);
}

// The eps of elements p0 .. p0+len-1 (p0 a multiple of 8) of the stream an op on D-typed data
// uses: the 16-bit stream for 16-bit data, the float32 stream otherwise.
template <class D>
static inline void gen_data_normals(float* __restrict eps, uint64_t seed, uint64_t offset,
                                    int64_t p0, int len, uint32_t sample) {
  if (D::SIXTEEN) gen_normals16<D>(eps, seed, offset + (uint64_t)(p0 / 8), (len + 7) / 8, sample);
  else gen_normals(eps, seed, offset + (uint64_t)(p0 / 4), (len + 3) / 4, sample);
}

static void k_philox_words(int32_t* out, int64_t b0, int64_t b1, uint64_t seed, uint64_t offset,
                           uint32_t sample) {
  const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  int64_t i = b0;
  while (i < b1) {
    const uint64_t block = offset + (uint64_t)i;
    const uint32_t lo0 = (uint32_t)block, hi = (uint32_t)(block >> 32);
    const int64_t left = b1 - i;
    const int nb = (int)blocks_before_wrap(lo0, left < TILE ? left : TILE);
    words_run(reinterpret_cast<uint32_t*>(out) + 4 * i, lo0, hi, sample, k0, k1, nb);
    i += nb;
  }
}

static void k_uniform(float* out, int64_t begin, int64_t end, uint64_t seed, uint64_t offset,
                      uint32_t sample) {
  alignas(64) uint32_t w[TILE];
  for (int64_t p0 = begin; p0 < end; p0 += TILE) {
    const int len = (int)(end - p0 < TILE ? end - p0 : TILE);
    split_at_wrap(words_run, w, 4, seed, offset + (uint64_t)(p0 / 4), (len + 3) / 4, sample);
    float* o = out + p0;
    for (int i = 0; i < len; ++i) o[i] = cdk::word_to_uniform(w[i]);
  }
}

template <class D>
static void normal_t(void* outv, int64_t begin, int64_t end, uint64_t seed, uint64_t offset,
                     uint32_t sample) {
  alignas(64) float eps[TILE];
  typename D::T* out = static_cast<typename D::T*>(outv);
  for (int64_t p0 = begin; p0 < end; p0 += TILE) {
    const int len = (int)(end - p0 < TILE ? end - p0 : TILE);
    gen_data_normals<D>(eps, seed, offset, p0, len, sample);
    typename D::T* o = out + p0;
    for (int i = 0; i < len; ++i) D::st(o, i, eps[i]);
  }
}

static void k_normal(void* out, int dtype, int64_t begin, int64_t end, uint64_t seed,
                     uint64_t offset, uint32_t sample) {
  if (dtype == kF32) normal_t<F32>(out, begin, end, seed, offset, sample);
  else if (dtype == kF16) normal_t<F16>(out, begin, end, seed, offset, sample);
  else normal_t<BF16>(out, begin, end, seed, offset, sample);
}

// -- per-channel helpers ----------------------------------------------------------------------
// Sigma of the elements p0 .. p0+len-1. Returns true (and *sc) when it is one value for the
// whole tile, else fills sig[0..len).
// fn(c, i, run) for each run of channel-c elements in p0 .. p0+len-1 (dense data of C channels
// of chan_stride elements each), i its offset in the range, in order.
template <class Fn>
static inline void for_channel_runs(int64_t C, int64_t cs, int64_t p0, int len, Fn&& fn) {
  int64_t c = (p0 / cs) % C;
  int64_t r = p0 % cs;
  for (int i = 0; i < len;) {
    const int64_t left = cs - r;
    const int run = (int)(left < len - i ? left : len - i);
    fn(c, i, run);
    i += run;
    r = 0;
    if (++c == C) c = 0;
  }
}

// The channel of element p0 when p0 .. p0+len-1 all lie in it, else -1.
static inline int64_t tile_channel(int64_t C, int64_t cs, int64_t p0, int len) {
  return cs - p0 % cs >= len ? (p0 / cs) % C : -1;
}

// Per-channel values table[c] of the elements p0 .. p0+len-1: true (and *v) when one channel
// holds them all, else fills out[0..len).
static inline bool tile_values(const float* __restrict table, int64_t C, int64_t cs, int64_t p0,
                               int len, float* __restrict out, float* v) {
  const int64_t c = tile_channel(C, cs, p0, len);
  if (c >= 0) { *v = table[c]; return true; }
  for_channel_runs(C, cs, p0, len, [&](int64_t ch, int i, int run) {
    const float w = table[ch];
    for (int j = 0; j < run; ++j) out[i + j] = w;
  });
  return false;
}

static inline bool tile_sigma(const PointArgs& a, int64_t p0, int len, float* __restrict sig,
                              float* sc) {
  if (a.sigma == nullptr) { *sc = a.sigma_value; return true; }
  if (a.C == 1) { *sc = a.sigma[0]; return true; }
  return tile_values(a.sigma, a.C, a.chan_stride, p0, len, sig, sc);
}

static inline double sum_d(const float* __restrict v, int n) {
  double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += (double)v[i + j];
  double s = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; i < n; ++i) s += (double)v[i];
  return s;
}

// acc[c] += sum of prod over the channel-c elements of p0 .. p0+len-1.
static inline void accum_channels(double* acc, const float* prod, int64_t p0, int len,
                                  int64_t C, int64_t cs) {
  if (C == 1) { acc[0] += sum_d(prod, len); return; }
  if (cs == 1) {
    int64_t c = p0 % C;
    for (int i = 0; i < len; ++i) {
      acc[c] += (double)prod[i];
      if (++c == C) c = 0;
    }
    return;
  }
  for_channel_runs(C, cs, p0, len,
                   [&](int64_t ch, int at, int run) { acc[ch] += sum_d(prod + at, run); });
}

// -- cd_step ----------------------------------------------------------------------------------
template <class D, int ACT, bool PS>
static inline void step_fwd_tile(const typename D::T* __restrict x,
                                 const typename D::T* __restrict f, typename D::T* __restrict y,
                                 const float* __restrict eps, const float* __restrict sig,
                                 float sc, float dt, float sqdt, int len) {
  for (int i = 0; i < len; ++i) {
    const float s = PS ? sig[i] * sqdt : sc;
    const float z = D::ld(x, i) + dt * D::ld(f, i) + s * eps[i];
    D::st(y, i, act_fwd<ACT>(z));
  }
}

template <class D, int ACT>
static void step_fwd_t(const PointArgs& a, int64_t begin, int64_t end) {
  alignas(64) float eps[TILE];
  alignas(64) float sig[TILE];
  using T = typename D::T;
  const T* x = static_cast<const T*>(a.x);
  const T* f = static_cast<const T*>(a.f);
  T* y = static_cast<T*>(a.y);
  for (int64_t p0 = begin; p0 < end; p0 += TILE) {
    const int len = (int)(end - p0 < TILE ? end - p0 : TILE);
    gen_data_normals<D>(eps, a.seed, a.offset, p0, len, 0u);
    float sv = 0.0f;
    if (tile_sigma(a, p0, len, sig, &sv)) {
      const float sc = a.sigma == nullptr ? a.noise_scale : sv * a.sqrt_dt;
      step_fwd_tile<D, ACT, false>(x + p0, f + p0, y + p0, eps, sig, sc, a.dt, a.sqrt_dt, len);
    } else {
      step_fwd_tile<D, ACT, true>(x + p0, f + p0, y + p0, eps, sig, 0.0f, a.dt, a.sqrt_dt, len);
    }
  }
}

template <class D>
static void step_fwd_d(const PointArgs& a, int64_t begin, int64_t end) {
  if (a.act == kRelu) step_fwd_t<D, kRelu>(a, begin, end);
  else step_fwd_t<D, kNone>(a, begin, end);
}

static void k_cd_step_fwd(const PointArgs& a, int64_t begin, int64_t end) {
  if (a.dtype == kF32) step_fwd_d<F32>(a, begin, end);
  else if (a.dtype == kF16) step_fwd_d<F16>(a, begin, end);
  else step_fwd_d<BF16>(a, begin, end);
}

template <class D, bool RELU>
static void step_bwd_t(const PointArgs& a, int64_t begin, int64_t end, double* acc) {
  alignas(64) float eps[TILE];
  alignas(64) float gz[TILE];
  using T = typename D::T;
  const T* gy = static_cast<const T*>(a.gy);
  const T* yv = static_cast<const T*>(a.yv);
  T* gx = static_cast<T*>(a.gx);
  T* gf = static_cast<T*>(a.gf);
  const float dt = a.dt;
  for (int64_t p0 = begin; p0 < end; p0 += TILE) {
    const int len = (int)(end - p0 < TILE ? end - p0 : TILE);
    const T* g = gy + p0;
    if (RELU) {
      const T* yy = yv + p0;
      for (int i = 0; i < len; ++i) gz[i] = D::ld(g, i) * (D::ld(yy, i) > 0.0f ? 1.0f : 0.0f);
    } else {
      for (int i = 0; i < len; ++i) gz[i] = D::ld(g, i);
    }
    if (gx) {
      T* o = gx + p0;
      for (int i = 0; i < len; ++i) D::st(o, i, gz[i]);
    }
    if (gf) {
      T* o = gf + p0;
      for (int i = 0; i < len; ++i) D::st(o, i, dt * gz[i]);
    }
    if (a.want_gsigma) {
      gen_data_normals<D>(eps, a.seed, a.offset, p0, len, 0u);
      for (int i = 0; i < len; ++i) eps[i] = gz[i] * eps[i];
      accum_channels(acc, eps, p0, len, a.C, a.chan_stride);
    }
  }
}

template <class D>
static void step_bwd_d(const PointArgs& a, int64_t begin, int64_t end, double* acc) {
  if (a.act == kRelu) step_bwd_t<D, true>(a, begin, end, acc);
  else step_bwd_t<D, false>(a, begin, end, acc);
}

static void k_cd_step_bwd(const PointArgs& a, int64_t begin, int64_t end, double* acc) {
  if (a.dtype == kF32) step_bwd_d<F32>(a, begin, end, acc);
  else if (a.dtype == kF16) step_bwd_d<F16>(a, begin, end, acc);
  else step_bwd_d<BF16>(a, begin, end, acc);
}

// -- cd_smooth --------------------------------------------------------------------------------
// x + s eps, one rounding where the clone has FMA (forward and backward alike, so relu's
// derivative is taken at the forward's point)
static inline __attribute__((always_inline)) float smooth_z(float x, float s, float e) {
  return smooth_fma(s, e, x);
}

template <int ACT, bool PS>
static inline void smooth_fwd_acc(float* __restrict acc, const float* __restrict xb,
                                  const float* __restrict eps, const float* __restrict sig,
                                  float sc, int len) {
  for (int i = 0; i < len; ++i) {
    const float s = PS ? sig[i] : sc;
    acc[i] += act_fwd<ACT>(smooth_z(xb[i], s, eps[i]));
  }
}

// The tile's x (and per-element sigma) are put in lane order once (tile_to_lanes), the K samples
// accumulate in that order, and the result goes back to element order once.
template <class D, int ACT>
static void smooth_fwd_t(const PointArgs& a, int64_t begin, int64_t end) {
  static_assert(TILE == 4 * PHILOX_SOA, "a cd_smooth tile is one Philox chunk");
  alignas(64) float buf[TILE];  // element order: x, then the result
  alignas(64) float sig[TILE];
  alignas(64) float xl[TILE];  // lane order from here on
  alignas(64) float sl[TILE];
  alignas(64) float eps[TILE];
  alignas(64) float acc[TILE];
  using T = typename D::T;
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const float K = (float)a.samples;
  for (int64_t p0 = begin; p0 < end; p0 += TILE) {
    const int len = (int)(end - p0 < TILE ? end - p0 : TILE);
    const int nb = (len + 3) / 4;  // Philox blocks = columns of each lane row
    const T* xx = x + p0;
    for (int i = 0; i < len; ++i) buf[i] = D::ld(xx, i);
    tile_to_lanes(xl, buf, len);
    for (int i = 0; i < TILE; ++i) acc[i] = 0.0f;
    float sc = 0.0f;
    const bool uni = tile_sigma(a, p0, len, sig, &sc);
    if (!uni) tile_to_lanes(sl, sig, len);
    for (int64_t k = 0; k < a.samples; ++k) {
      gen_normals_fast_lanes(eps, a.seed, a.offset + (uint64_t)(p0 / 4), nb, (uint32_t)k);
      for (int j = 0; j < 4; ++j) {
        const int o = j * PHILOX_SOA;
        if (uni) smooth_fwd_acc<ACT, false>(acc + o, xl + o, eps + o, sl + o, sc, nb);
        else smooth_fwd_acc<ACT, true>(acc + o, xl + o, eps + o, sl + o, sc, nb);
      }
    }
    tile_from_lanes(buf, acc, len);
    T* out = y + p0;
    for (int i = 0; i < len; ++i) D::st(out, i, buf[i] / K);
  }
}

template <int ACT, bool PS, bool GS>
static inline void smooth_bwd_acc(float* __restrict dx, float* __restrict ds,
                                  const float* __restrict xb, const float* __restrict eps,
                                  const float* __restrict sig, float sc, int len) {
  for (int i = 0; i < len; ++i) {
    const float s = PS ? sig[i] : sc;
    const float d = act_grad<ACT>(smooth_z(xb[i], s, eps[i]));
    dx[i] += d;
    if (GS) ds[i] += d * eps[i];
  }
}

// Lane order inside the tile, as smooth_fwd_t.
template <class D, int ACT>
static void smooth_bwd_t(const PointArgs& a, int64_t begin, int64_t end, double* accs) {
  alignas(64) float buf[TILE];  // element order
  alignas(64) float sig[TILE];
  alignas(64) float xl[TILE];  // lane order
  alignas(64) float sl[TILE];
  alignas(64) float eps[TILE];
  alignas(64) float dx[TILE];
  alignas(64) float ds[TILE];
  using T = typename D::T;
  const T* x = static_cast<const T*>(a.x);
  const T* gy = static_cast<const T*>(a.gy);
  T* gx = static_cast<T*>(a.gx);
  const float K = (float)a.samples;
  const bool gs = a.want_gsigma;
  for (int64_t p0 = begin; p0 < end; p0 += TILE) {
    const int len = (int)(end - p0 < TILE ? end - p0 : TILE);
    const int nb = (len + 3) / 4;
    const T* xx = x + p0;
    for (int i = 0; i < len; ++i) buf[i] = D::ld(xx, i);
    tile_to_lanes(xl, buf, len);
    for (int i = 0; i < TILE; ++i) { dx[i] = 0.0f; ds[i] = 0.0f; }
    float sc = 0.0f;
    const bool uni = tile_sigma(a, p0, len, sig, &sc);
    if (!uni) tile_to_lanes(sl, sig, len);
    for (int64_t k = 0; k < a.samples; ++k) {
      gen_normals_fast_lanes(eps, a.seed, a.offset + (uint64_t)(p0 / 4), nb, (uint32_t)k);
      for (int j = 0; j < 4; ++j) {
        const int o = j * PHILOX_SOA;
        float* dxo = dx + o;
        float* dso = ds + o;
        const float* xo = xl + o;
        const float* eo = eps + o;
        const float* so = sl + o;
        if (uni) {
          if (gs) smooth_bwd_acc<ACT, false, true>(dxo, dso, xo, eo, so, sc, nb);
          else smooth_bwd_acc<ACT, false, false>(dxo, dso, xo, eo, so, sc, nb);
        } else {
          if (gs) smooth_bwd_acc<ACT, true, true>(dxo, dso, xo, eo, so, sc, nb);
          else smooth_bwd_acc<ACT, true, false>(dxo, dso, xo, eo, so, sc, nb);
        }
      }
    }
    tile_from_lanes(buf, dx, len);
    const T* g = gy + p0;
    T* o = gx + p0;
    for (int i = 0; i < len; ++i) D::st(o, i, D::ld(g, i) * buf[i] / K);
    if (gs) {
      tile_from_lanes(buf, ds, len);
      for (int i = 0; i < len; ++i) buf[i] = D::ld(g, i) * buf[i] / K;
      accum_channels(accs, buf, p0, len, a.C, a.chan_stride);
    }
  }
}

template <class D>
static void smooth_fwd_d(const PointArgs& a, int64_t begin, int64_t end) {
  switch (a.act) {
    case kRelu: smooth_fwd_t<D, kRelu>(a, begin, end); break;
    case kGelu: smooth_fwd_t<D, kGelu>(a, begin, end); break;
    case kTanh: smooth_fwd_t<D, kTanh>(a, begin, end); break;
    case kSigmoid: smooth_fwd_t<D, kSigmoid>(a, begin, end); break;
    case kSoftplus: smooth_fwd_t<D, kSoftplus>(a, begin, end); break;
    default: smooth_fwd_t<D, kNone>(a, begin, end); break;
  }
}

template <class D>
static void smooth_bwd_d(const PointArgs& a, int64_t begin, int64_t end, double* acc) {
  switch (a.act) {
    case kRelu: smooth_bwd_t<D, kRelu>(a, begin, end, acc); break;
    case kGelu: smooth_bwd_t<D, kGelu>(a, begin, end, acc); break;
    case kTanh: smooth_bwd_t<D, kTanh>(a, begin, end, acc); break;
    case kSigmoid: smooth_bwd_t<D, kSigmoid>(a, begin, end, acc); break;
    case kSoftplus: smooth_bwd_t<D, kSoftplus>(a, begin, end, acc); break;
    default: smooth_bwd_t<D, kNone>(a, begin, end, acc); break;
  }
}

static void k_cd_smooth_fwd(const PointArgs& a, int64_t begin, int64_t end) {
  if (a.dtype == kF32) smooth_fwd_d<F32>(a, begin, end);
  else if (a.dtype == kF16) smooth_fwd_d<F16>(a, begin, end);
  else smooth_fwd_d<BF16>(a, begin, end);
}

static void k_cd_smooth_bwd(const PointArgs& a, int64_t begin, int64_t end, double* acc) {
  if (a.dtype == kF32) smooth_bwd_d<F32>(a, begin, end, acc);
  else if (a.dtype == kF16) smooth_bwd_d<F16>(a, begin, end, acc);
  else smooth_bwd_d<BF16>(a, begin, end, acc);
}

// -- ensemble_mean ----------------------------------------------------------------------------
template <class D>
static inline void load_row(float* __restrict dst, const typename D::T* __restrict src,
                            int64_t C) {
  for (int64_t c = 0; c < C; ++c) dst[c] = D::ld(src, c);
}

// max of z[0..C) (16 partial maxima, so the loop vectorises)
static inline float row_max(const float* __restrict z, int64_t C) {
  float mp[16];
  for (int j = 0; j < 16; ++j) mp[j] = -__builtin_inff();
  int64_t c = 0;
  for (; c + 16 <= C; c += 16)
    for (int j = 0; j < 16; ++j) mp[j] = z[c + j] > mp[j] ? z[c + j] : mp[j];
  float m = -__builtin_inff();
  for (int j = 0; j < 16; ++j) m = mp[j] > m ? mp[j] : m;
  for (; c < C; ++c) m = z[c] > m ? z[c] : m;
  return m;
}

// log-sum-exp of z[0..C)
static inline float row_lse(const float* __restrict z, int64_t C) {
  const float m = row_max(z, C);
  float sp[16];
  for (int j = 0; j < 16; ++j) sp[j] = 0.0f;
  int64_t c = 0;
  for (; c + 16 <= C; c += 16)
    for (int j = 0; j < 16; ++j) sp[j] += exp_f(z[c + j] - m);
  float s = 0.0f;
  for (int j = 0; j < 16; ++j) s += sp[j];
  for (; c < C; ++c) s += exp_f(z[c] - m);
  return m + log_f(s);
}

static inline float dot_f(const float* __restrict a, const float* __restrict b, int64_t C) {
  float sp[16];
  for (int j = 0; j < 16; ++j) sp[j] = 0.0f;
  int64_t c = 0;
  for (; c + 16 <= C; c += 16)
    for (int j = 0; j < 16; ++j) sp[j] += a[c + j] * b[c + j];
  float s = 0.0f;
  for (int j = 0; j < 16; ++j) s += sp[j];
  for (; c < C; ++c) s += a[c] * b[c];
  return s;
}

// The float32 log of the mean probability of row b: res[c] = log((1/K) sum_k softmax(z_k)_c),
// via a log-sum-exp over k (two passes). Scratch: z, mx, acc [C], lse [K]; res may alias acc.
template <class D>
static void logprob_row(const typename D::T* inp, int64_t b, int64_t K, int64_t B, int64_t C,
                        float* __restrict z, float* __restrict mx, float* acc, float* lse,
                        float* res) {
  const float logK = (float)__builtin_log((double)K);
  for (int64_t c = 0; c < C; ++c) { mx[c] = -__builtin_inff(); acc[c] = 0.0f; }
  for (int64_t k = 0; k < K; ++k) {
    load_row<D>(z, inp + (k * B + b) * C, C);
    const float l = row_lse(z, C);
    lse[k] = l;
    for (int64_t c = 0; c < C; ++c) {
      const float v = z[c] - l;
      mx[c] = v > mx[c] ? v : mx[c];
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    load_row<D>(z, inp + (k * B + b) * C, C);
    const float l = lse[k];
    for (int64_t c = 0; c < C; ++c) {
      const float m = mx[c] == -__builtin_inff() ? 0.0f : mx[c];
      acc[c] += exp_f((z[c] - l) - m);
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    const float r = mx[c] + log_f(acc[c]) - logK;
    res[c] = mx[c] == -__builtin_inff() ? -__builtin_inff() : r;
  }
}

// -- 16-lane vectors ----------------------------------------------------------------------------
// GCC vector types of 16 floats: one zmm in the AVX-512 clone, two ymm in AVX2, four xmm in
// baseline (the std-step kernels, and the ensemble rows' vectors in AVX-512).
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

static inline __attribute__((always_inline)) v16f ld16(const float* p) {
  v16f v;
  memcpy(&v, p, sizeof v);
  return v;
}
static inline __attribute__((always_inline)) void st16(float* p, v16f v) { memcpy(p, &v, sizeof v); }
static inline __attribute__((always_inline)) v16f splat16(float x) { return v16f{} + x; }
static inline __attribute__((always_inline)) float hsum16(v16f v) {
  const v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4f c = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (c[0] + c[1]) + (c[2] + c[3]);
}

// Rows are processed as whole vectors, the last one padded with -inf (softmax weight exactly 0)
// in registers: a C = 100 row spent about 40 % of its time in a scalar 4-element tail. Scratch
// rows are Cp = C rounded up to 16 long (a whole number of vectors at every width).
static inline int64_t padded16(int64_t C) { return (C + 15) & ~(int64_t)15; }

// The softmax of a padded row in GCC vector types of the clone's native width (EV: 16 floats,
// one zmm, in AVX-512; 8, one ymm, in AVX2; 4 in baseline). Loops written with scalar partial
// arrays spilled the partial maxima and sums through the stack (store-forwarding stalls) at
// every row; and 16-lane vectors in the AVX2 clone (two ymm) had their ?:, comparisons and
// halves' joins lowered to scalar code through the stack, 7x slower than AVX-512.
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v4u __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));
#if CDK_ISA_LEVEL == 2
typedef v16f EV;
typedef v16u EVu;
typedef v16i EVi;
#elif CDK_ISA_LEVEL == 1
typedef v8f EV;
typedef v8u EVu;
typedef v8i EVi;
#else
typedef v4f EV;
typedef v4u EVu;
typedef v4i EVi;
#endif
constexpr int EW = (int)(sizeof(EV) / sizeof(float));

static inline __attribute__((always_inline)) EV ev_splat(float x) { return EV{} + x; }
static inline __attribute__((always_inline)) EV ev_ld(const float* p) {
  EV v;
  memcpy(&v, p, sizeof v);
  return v;
}
static inline __attribute__((always_inline)) void ev_st(float* p, EV v) { memcpy(p, &v, sizeof v); }
static inline __attribute__((always_inline)) EV ev_max(EV a, EV b) {  // a > b ? a : b
#if CDK_ISA_LEVEL == 2  // (b when unordered, as maxps)
  return (EV)_mm512_max_ps((__m512)a, (__m512)b);
#else
  return a > b ? a : b;  // native width: one vmaxps
#endif
}
static inline __attribute__((always_inline)) EV ev_fma(EV a, EV b, EV c) {
#if CDK_ISA_LEVEL == 2
  return (EV)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif CDK_ISA_LEVEL == 1
  return (EV)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}
static inline __attribute__((always_inline)) EVu ev_lt(EV a, EV b) {  // all ones where a < b
#if CDK_ISA_LEVEL == 2
  return (EVu)_mm512_movm_epi32(_mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_LT_OQ));
#else
  return (EVu)(a < b);
#endif
}
static inline __attribute__((always_inline)) float hmax4(v4f m4) {
  const float x = m4[0] > m4[1] ? m4[0] : m4[1], y = m4[2] > m4[3] ? m4[2] : m4[3];
  return x > y ? x : y;
}
static inline __attribute__((always_inline)) float ev_hmax(EV v) {  // a tree of halves
#if CDK_ISA_LEVEL >= 1
#if CDK_ISA_LEVEL == 2
  const v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const v8f b = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v8f m8 = a > b ? a : b;
#else
  const v8f m8 = v;
#endif
  const v4f c = __builtin_shufflevector(m8, m8, 0, 1, 2, 3);
  const v4f d = __builtin_shufflevector(m8, m8, 4, 5, 6, 7);
  return hmax4(c > d ? c : d);
#else
  return hmax4(v);
#endif
}
static inline __attribute__((always_inline)) float ev_hsum(EV v) {
#if CDK_ISA_LEVEL == 2
  return hsum16(v);
#elif CDK_ISA_LEVEL == 1
  const v4f c = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return (c[0] + c[1]) + (c[2] + c[3]);
#else
  return (v[0] + v[1]) + (v[2] + v[3]);
#endif
}

// exp(x) for x <= 0 (a logit minus its row maximum), ~2 ulp; below -87.3 it is 0, nan stays nan.
// With fused multiply-adds about half the instructions of exp_f (written for
// -ffp-contract=off).
static inline __attribute__((always_inline)) EV exp_nonpos(EV xin) {
  const EV lo = ev_splat(-87.33654f);
  const EV x = ev_max(lo, xin);  // xin < lo ? lo : xin, nan kept
  const EV shifter = ev_splat(12582912.0f);  // 1.5 * 2^23: round to nearest integer
  const EV n = ev_fma(x, ev_splat(1.44269504088896341f), shifter) - shifter;
  EV r = ev_fma(n, ev_splat(-6.93145751953125e-1f), x);
  r = ev_fma(n, ev_splat(-1.42860682030941723212e-6f), r);
  EV p = ev_splat(1.9875691500e-4f);
  p = ev_fma(p, r, ev_splat(1.3981999507e-3f));
  p = ev_fma(p, r, ev_splat(8.3334519073e-3f));
  p = ev_fma(p, r, ev_splat(4.1665795894e-2f));
  p = ev_fma(p, r, ev_splat(1.6666665459e-1f));
  p = ev_fma(p, r, ev_splat(5.0000001201e-1f));
  p = ev_fma(p, r * r, r) + ev_splat(1.0f);
  // n in [-126, 0] (exact); the bit arithmetic in unsigned lanes (a nan input's lane is
  // garbage here and nan again after the multiply below)
  const EVu ni = (EVu)__builtin_convertvector(n, EVi);
  const EV scale = (EV)((ni + 127u) << 23);
  const EV e = p * scale;
  return (EV)((EVu)e & ~ev_lt(xin, lo));  // 0 below lo
}

// 16 elements of a row starting at src, widened to float32 in registers (the std-step kernels
// below). Rows are read in place: copying them to a scratch row first cost a store-forwarding
// stall on every vector load of the copy (memmove and scalar pad stores, then 64-byte loads).
template <class D>
static inline __attribute__((always_inline)) v16f row16(const typename D::T* __restrict src) {
  if (D::SIXTEEN) {
    v16f r;
    for (int j = 0; j < 16; ++j) r[j] = D::ld(src, j);
    return r;
  }
  return ld16(reinterpret_cast<const float*>(src));
}

// EW elements of a row (only the first `len` when len < EW, possibly none; the other lanes are
// -inf, whose softmax weight is exactly 0), widened to float32.
template <class D>
static inline __attribute__((always_inline)) EV row_ev(const typename D::T* __restrict src) {
  if (D::SIXTEEN) {
    EV r;
    for (int j = 0; j < EW; ++j) r[j] = D::ld(src, j);
    return r;
  }
  return ev_ld(reinterpret_cast<const float*>(src));
}

template <class D>
static inline EV row_ev_tail(const typename D::T* __restrict src, int len) {
#if CDK_ISA_LEVEL == 2
  if (!D::SIXTEEN)
    return (EV)_mm512_mask_loadu_ps(_mm512_set1_ps(-__builtin_inff()),
                                    (__mmask16)((1u << len) - 1u), src);
#endif
  EV r = ev_splat(-__builtin_inff());
  for (int j = 0; j < len; ++j) r[j] = D::ld(src, j);
  return r;
}

// e[0..Cp) = exp(row - m) with m the row's maximum (Cp = C rounded up to 16; padded lanes 0);
// returns the sum of e and sets *m. One exp per element.
template <class D>
static inline float row_exp(const typename D::T* __restrict row, int64_t C, float* __restrict e,
                            float* m_out) {
  const int64_t full = C - C % EW, Cp = padded16(C);
  EV mv = ev_splat(-__builtin_inff());
  for (int64_t c = 0; c < full; c += EW) mv = ev_max(mv, row_ev<D>(row + c));
  const EV t = full < C ? row_ev_tail<D>(row + full, (int)(C - full)) : mv;
  const float mf = ev_hmax(ev_max(mv, t));
  const EV m = ev_splat(mf);
  EV sv = EV{};
  for (int64_t c = 0; c < full; c += EW) {
    const EV v = exp_nonpos(row_ev<D>(row + c) - m);
    ev_st(e + c, v);
    sv += v;
  }
  int64_t c = full;
  if (full < C) {
    const EV v = exp_nonpos(t - m);
    ev_st(e + c, v);
    sv += v;
    c += EW;
  }
  for (; c < Cp; c += EW) ev_st(e + c, EV{});  // whole padding vectors (EW < 16)
  *m_out = mf;
  return ev_hsum(sv);
}

// acc[0..Cp) += softmax(row) (the padded lanes add 0); e is a [Cp] scratch row.
template <class D>
static inline void add_softmax_row(const typename D::T* __restrict row, int64_t C,
                                   float* __restrict e, float* __restrict acc) {
  float m;
  const EV inv = ev_splat(1.0f / row_exp<D>(row, C, e, &m));
  const int64_t Cp = padded16(C);
  for (int64_t c = 0; c < Cp; c += EW) ev_st(acc + c, ev_ld(acc + c) + ev_ld(e + c) * inv);
}

// Smallest mean probability (times K) whose log the one-pass logprob takes directly: above it
// the float32 probabilities are normal numbers with full relative precision; below it (logits
// spread by more than ~70 in every replica) the row takes the log-sum-exp route.
constexpr float kLogprobDirectMin = 7.8886090522101181e-31f;  // 2^-100
// The backward's twin, on out_c = log(mean probability): just above log 2^-100 = -69.3.
constexpr float kLogprobDirectLogMin = -69.0f;

// scratch: 5*Cp + K floats (Cp = padded16(C))
template <class D>
static void ens_fwd_t(const EnsArgs& a, int64_t b0, int64_t b1, float* scratch) {
  using T = typename D::T;
  const int64_t K = a.K, B = a.B, C = a.C, Cp = padded16(C);
  const T* inp = static_cast<const T*>(a.inp);
  T* out = static_cast<T*>(a.out);
  const float Kf = (float)K;
  if (a.space == kLogit) {
    // mean over k of the rows b0..b1 as one flat range: whole vectors, no per-row overhead
    constexpr int64_t CH = 1024;
    alignas(64) float acc[CH];
    const int64_t j0 = b0 * C, j1 = b1 * C;
    for (int64_t j = j0; j < j1; j += CH) {
      const int64_t n = j1 - j < CH ? j1 - j : CH;
      const T* r0 = inp + j;
      for (int64_t i = 0; i < n; ++i) acc[i] = D::ld(r0, i);
      for (int64_t k = 1; k < K; ++k) {
        const T* r = inp + k * B * C + j;
        for (int64_t i = 0; i < n; ++i) acc[i] += D::ld(r, i);
      }
      T* o = out + j;
      for (int64_t i = 0; i < n; ++i) D::st(o, i, acc[i] / Kf);
    }
    return;
  }
  float* __restrict z = scratch;
  float* __restrict acc = z + Cp;
  float* __restrict mx = acc + Cp;
  float* __restrict lse = mx + Cp;
  const float logK = (float)__builtin_log((double)K);
  for (int64_t b = b0; b < b1; ++b) {
    T* o = out + b * C;
    for (int64_t c = 0; c < Cp; ++c) acc[c] = 0.0f;
    for (int64_t k = 0; k < K; ++k) add_softmax_row<D>(inp + (k * B + b) * C, C, z, acc);
    if (a.space == kProb) {
      for (int64_t c = 0; c < C; ++c) D::st(o, c, acc[c] / Kf);
      continue;
    }
    // logprob: log of the summed probabilities when every one is a normal float (one exp
    // per element, as prob), else the two-pass log-sum-exp over k for this row.
    float amin = __builtin_inff();
    for (int64_t c = 0; c < C; ++c) amin = acc[c] < amin ? acc[c] : amin;
    if (amin >= kLogprobDirectMin) {  // false for nan too
      for (int64_t c = 0; c < C; ++c) D::st(o, c, log_f(acc[c]) - logK);
    } else {
      logprob_row<D>(inp, b, K, B, C, z, mx, acc, lse, acc);
      for (int64_t c = 0; c < C; ++c) D::st(o, c, acc[c]);
    }
  }
}

// scratch: 5*Cp + K floats. Per (b, k) one in-place pass for the softmax (row_exp), then
// elementwise loops over scratch rows (written with whole-vector stores, so no store-forwarding
// stalls), instead of a row copy, a log-sum-exp and a second exp per element.
template <class D>
static void ens_bwd_t(const EnsArgs& a, int64_t b0, int64_t b1, float* scratch) {
  using T = typename D::T;
  const int64_t K = a.K, B = a.B, C = a.C, Cp = padded16(C);
  const T* inp = static_cast<const T*>(a.inp);
  const T* gout = static_cast<const T*>(a.gout);
  const T* outv = static_cast<const T*>(a.outv);
  T* gin = static_cast<T*>(a.gin);
  const float Kf = (float)K, invK = 1.0f / Kf;  // (a multiply per element, not a division)
  if (a.space == kLogit) {  // d/dz_k = g / K for every k: one flat loop per replica
    for (int64_t k = 0; k < K; ++k) {
      T* o = gin + k * B * C;
      for (int64_t j = b0 * C; j < b1 * C; ++j) D::st(o, j, D::ld(gout, j) * invK);
    }
    return;
  }
  float* __restrict z = scratch;
  float* __restrict p = z + Cp;
  float* __restrict g = p + Cp;
  float* __restrict ov = g + Cp;
  float* __restrict q = ov + Cp;
  float* __restrict invP = z;  // (z is free once ov is known)
  for (int64_t b = b0; b < b1; ++b) {
    load_row<D>(g, gout + b * C, C);
    for (int64_t c = C; c < Cp; ++c) g[c] = 0.0f;  // (dot_f runs over whole vectors)
    bool direct = false;
    if (a.space == kLogprob) {
      // float32 `out` is what the forward stored; a 16-bit `out` is rounded (|out| ~ 10 in
      // float16 carries ~5e-3 absolute error, which exp() turns into a 0.5 % gradient error),
      // so recompute it in float32 from the input instead.
      if (a.dtype == kF32) load_row<D>(ov, outv + b * C, C);
      else logprob_row<D>(inp, b, K, B, C, z, q, p, q + C, ov);
      // P_c = exp(out_c) >= 2^-100 for every class (the forward's direct route): 1/P_c once
      // per row, then no exp per (k, c); else the bounded exp per element below
      float omin = __builtin_inff();
      for (int64_t c = 0; c < C; ++c) omin = ov[c] < omin ? ov[c] : omin;
      direct = omin >= kLogprobDirectLogMin;  // false for nan
      if (direct)
        for (int64_t c = 0; c < C; ++c) invP[c] = exp_f(-ov[c]);  // 1 / P_c <= 2^100
    }
    for (int64_t k = 0; k < K; ++k) {
      const T* row = inp + (k * B + b) * C;
      T* o = gin + (k * B + b) * C;
      float m;
      const float s = row_exp<D>(row, C, p, &m);
      const float inv = 1.0f / s;
      for (int64_t c = 0; c < Cp; ++c) p[c] *= inv;  // softmax, 0 on padded lanes
      if (a.space == kProb) {
        const float dot = dot_f(g, p, Cp);
        for (int64_t c = 0; c < C; ++c) D::st(o, c, p[c] * (g[c] - dot) * invK);
      } else if (direct) {
        // q_c = g_c p_kc / P_c with 1/P_c computed once per row b (every P_c >= 2^-100)
        for (int64_t c = 0; c < C; ++c) q[c] = g[c] * p[c] * invP[c];
      } else {
        // q_c = g_c exp(z_c - lse_k - out_c): the exponent is at most log K, for any P_c
        const float l = m + log_f(s);
        for (int64_t c = 0; c < C; ++c) q[c] = g[c] * exp_f((D::ld(row, c) - l) - ov[c]);
      }
      if (a.space == kLogprob) {
        float sq = 0.0f;
        for (int64_t c = 0; c < C; ++c) sq += q[c];
        for (int64_t c = 0; c < C; ++c) D::st(o, c, (q[c] - p[c] * sq) * invK);
      }
    }
  }
}

static void k_ens_fwd(const EnsArgs& a, int64_t b0, int64_t b1, float* scratch) {
  if (a.dtype == kF32) ens_fwd_t<F32>(a, b0, b1, scratch);
  else if (a.dtype == kF16) ens_fwd_t<F16>(a, b0, b1, scratch);
  else ens_fwd_t<BF16>(a, b0, b1, scratch);
}

static void k_ens_bwd(const EnsArgs& a, int64_t b0, int64_t b1, float* scratch) {
  if (a.dtype == kF32) ens_bwd_t<F32>(a, b0, b1, scratch);
  else if (a.dtype == kF16) ens_bwd_t<F16>(a, b0, b1, scratch);
  else ens_bwd_t<BF16>(a, b0, b1, scratch);
}

// -- std-scaled step: moments of z = x + dt*f, and the gradient through std(z) ---------------
// Both in 16-lane vectors (row16 widens 16-bit data in registers): the per-element loops with
// scalar partial arrays (moments) and with the optional gy/gf tested per element (backward)
// stayed scalar, about half the copy bandwidth in float32 and a fifth of it in bfloat16.
template <class D>
static inline __attribute__((always_inline)) void put16(typename D::T* __restrict dst, v16f v) {
  if (D::SIXTEEN) {
    for (int j = 0; j < 16; ++j) D::st(dst, j, v[j]);
  } else {
    st16(reinterpret_cast<float*>(dst), v);
  }
}

// Per tile: float32 partial sums in 16 lanes (32 terms each), added to double accumulators.
template <class D>
static void zmom_t(const PointArgs& a, int64_t begin, int64_t end, double* acc) {
  using T = typename D::T;
  const T* __restrict x = static_cast<const T*>(a.x);
  const T* __restrict f = static_cast<const T*>(a.f);
  const float dt = a.dt, K = a.zshift;
  const v16f dtv = splat16(dt), Kv = splat16(K);
  for (int64_t p0 = begin; p0 < end; p0 += TILE) {
    const int len = (int)(end - p0 < TILE ? end - p0 : TILE);
    const T* xx = x + p0;
    const T* ff = f + p0;
    v16f s1 = splat16(0.0f), s2 = splat16(0.0f);
    int i = 0;
    for (; i + 16 <= len; i += 16) {
      const v16f d = (row16<D>(xx + i) + dtv * row16<D>(ff + i)) - Kv;
      s1 += d;
      s2 += d * d;
    }
    double t1 = 0.0, t2 = 0.0;
    for (int j = 0; j < 16; ++j) { t1 += (double)s1[j]; t2 += (double)s2[j]; }
    for (; i < len; ++i) {
      const float d = (D::ld(xx, i) + dt * D::ld(ff, i)) - K;
      t1 += (double)d;
      t2 += (double)d * (double)d;
    }
    acc[0] += t1;
    acc[1] += t2;
  }
}

template <class D, bool HAS_G, bool HAS_GF>
static void zbwd_run(const PointArgs& a, int64_t begin, int64_t end) {
  using T = typename D::T;
  const T* __restrict x = static_cast<const T*>(a.x);
  const T* __restrict f = static_cast<const T*>(a.f);
  const T* __restrict gy = static_cast<const T*>(a.gy);
  T* __restrict gx = static_cast<T*>(a.gx);
  T* __restrict gf = static_cast<T*>(a.gf);
  const float dt = a.dt, m = a.zmean, za = a.za, zb = a.zb;
  const v16f dtv = splat16(dt), mv = splat16(m), zav = splat16(za), zbv = splat16(zb);
  int64_t p = begin;
  for (; p + 16 <= end; p += 16) {
    const v16f z = row16<D>(x + p) + dtv * row16<D>(f + p);
    const v16f g = (HAS_G ? row16<D>(gy + p) : splat16(0.0f)) + zav * (z - mv) + zbv;
    put16<D>(gx + p, g);
    if (HAS_GF) put16<D>(gf + p, dtv * g);
  }
  for (; p < end; ++p) {
    const float z = D::ld(x, p) + dt * D::ld(f, p);
    const float g = (HAS_G ? D::ld(gy, p) : 0.0f) + za * (z - m) + zb;
    D::st(gx, p, g);
    if (HAS_GF) D::st(gf, p, dt * g);
  }
}

template <class D>
static void zbwd_t(const PointArgs& a, int64_t begin, int64_t end) {
  if (a.gy && a.gf) zbwd_run<D, true, true>(a, begin, end);
  else if (a.gy) zbwd_run<D, true, false>(a, begin, end);
  else if (a.gf) zbwd_run<D, false, true>(a, begin, end);
  else zbwd_run<D, false, false>(a, begin, end);
}

static void k_z_moments(const PointArgs& a, int64_t begin, int64_t end, double* acc) {
  if (a.dtype == kF32) zmom_t<F32>(a, begin, end, acc);
  else if (a.dtype == kF16) zmom_t<F16>(a, begin, end, acc);
  else zmom_t<BF16>(a, begin, end, acc);
}

static void k_z_std_bwd(const PointArgs& a, int64_t begin, int64_t end) {
  if (a.dtype == kF32) zbwd_t<F32>(a, begin, end);
  else if (a.dtype == kF16) zbwd_t<F16>(a, begin, end);
  else zbwd_t<BF16>(a, begin, end);
}

// The std step's sum_c g eps (its backward's first pass). Regenerating eps costs the Philox
// and Box-Muller work of the forward again (about 0.5 ns per element on two cores, several
// times a read of the data); the forward's output already holds it: y = z + s eps with
// z = x + dt*f recomputed here exactly as the forward did (same expression, same contraction),
// so
//   eps~ = (y - z) / s,  |eps~ - eps| <= 2^-24 (|y|/s + 3|eps| + 1)
// (the rounding of y, of the subtraction and of the product by 1/s). A float32 tile keeps eps~
// when its max |y|/s < y_guard = 64, which bounds the error by 2^-24 (64 + 19) < 5e-6
// (docs/noise.md 3d); other tiles, 16-bit data (y rounded to 8 or 11 bits) and a missing y
// regenerate it.
// prod[i] = g_i (y_i - z_i) rs_i (rs = 1/s: one value rs1 when UNI, else per element);
// returns max_i |y_i| rs_i, what the bound above needs.
template <bool UNI>
static inline float eps_back_tile(float* __restrict prod, const float* __restrict g,
                                  const float* __restrict y, const float* __restrict x,
                                  const float* __restrict f, const float* __restrict rs,
                                  float rs1, float dt, int len) {
  const EVu absmask = EVu{} + 0x7fffffffu;
  const EV dtv = ev_splat(dt), rsv = ev_splat(rs1);
  EV m = ev_splat(0.0f);  // (native-width vectors: GCC leaves a float max reduction scalar)
  int i = 0;
  for (; i + EW <= len; i += EW) {
    const EV yv = ev_ld(y + i);
    const EV r = UNI ? rsv : ev_ld(rs + i);
    ev_st(prod + i, ev_ld(g + i) * ((yv - (ev_ld(x + i) + dtv * ev_ld(f + i))) * r));
    m = ev_max((EV)((EVu)yv & absmask) * r, m);
  }
  float q = 0.0f;
  for (int j = 0; j < EW; ++j) q = m[j] > q ? m[j] : q;
  for (; i < len; ++i) {
    const float r = UNI ? rs1 : rs[i];
    prod[i] = g[i] * ((y[i] - (x[i] + dt * f[i])) * r);
    const float qi = __builtin_fabsf(y[i]) * r;
    q = qi > q ? qi : q;
  }
  return q;
}

static void std_gsum_f32(const PointArgs& a, int64_t begin, int64_t end, double* acc) {
  alignas(64) float prod[TILE];
  alignas(64) float rs[TILE];
  const float* __restrict g = static_cast<const float*>(a.gy);
  const float* __restrict y = static_cast<const float*>(a.yv);
  const float* __restrict x = static_cast<const float*>(a.x);
  const float* __restrict f = static_cast<const float*>(a.f);
  const float dt = a.dt, sqdt = a.sqrt_dt;
  const bool read_back = y != nullptr && a.y_guard > 0.0f;
  // per channel: 1/s with s as the forward rounded it (sigma * sqrt(dt)), and whether s is
  // finite and > 0 (else that channel's tiles regenerate); once per call, not per element
  // (channels innermost, chan_stride 1: the table repeated to C + TILE entries, so a tile's rs
  // is a pointer into it)
  std::vector<float> rs_c;
  std::vector<char> ok_c;
  bool all_ok = true;
  if (read_back && a.sigma != nullptr && a.C > 1) {
    rs_c.resize((size_t)a.C);
    ok_c.resize((size_t)a.C);
    for (int64_t c = 0; c < a.C; ++c) {
      const float s = a.sigma[c] * sqdt;
      ok_c[(size_t)c] = s > 0.0f && s < __builtin_inff();
      all_ok &= ok_c[(size_t)c] != 0;
      rs_c[(size_t)c] = 1.0f / s;
    }
    if (a.chan_stride == 1) {
      rs_c.resize((size_t)a.C + TILE);
      for (size_t j = (size_t)a.C; j < rs_c.size(); ++j) rs_c[j] = rs_c[j - (size_t)a.C];
    }
  }
  for (int64_t p0 = begin; p0 < end; p0 += TILE) {
    const int len = (int)(end - p0 < TILE ? end - p0 : TILE);
    bool back = false;
    if (read_back) {
      // every s finite and > 0 (else regenerate), then max |y|/s below y_guard
      float sv = 0.0f, q;
      bool ok = true;
      if (rs_c.empty()) {  // one sigma for the whole tensor (tile_sigma: always uniform)
        tile_sigma(a, p0, len, rs, &sv);
        const float s1 = sv * sqdt;
        ok = s1 > 0.0f && s1 < __builtin_inff();
        q = eps_back_tile<true>(prod, g + p0, y + p0, x + p0, f + p0, rs, 1.0f / s1, dt, len);
      } else if (a.chan_stride == 1) {
        ok = all_ok;
        q = eps_back_tile<false>(prod, g + p0, y + p0, x + p0, f + p0,
                                 rs_c.data() + p0 % a.C, 0.0f, dt, len);
      } else if (const int64_t c0 = tile_channel(a.C, a.chan_stride, p0, len); c0 >= 0) {
        ok = ok_c[(size_t)c0] != 0;
        q = eps_back_tile<true>(prod, g + p0, y + p0, x + p0, f + p0, rs, rs_c[(size_t)c0], dt,
                                len);
      } else {
        // the tile crosses channel boundaries: rs per element from the per-channel table (a
        // division per element measured 50 % slower for the whole backward at 28x28)
        for_channel_runs(a.C, a.chan_stride, p0, len, [&](int64_t c, int i, int run) {
          const float v = rs_c[(size_t)c];
          for (int j = 0; j < run; ++j) rs[i + j] = v;
          ok &= ok_c[(size_t)c] != 0;
        });
        q = eps_back_tile<false>(prod, g + p0, y + p0, x + p0, f + p0, rs, 0.0f, dt, len);
      }
      back = ok && q < a.y_guard;
    }
    if (!back) {
      gen_data_normals<F32>(prod, a.seed, a.offset, p0, len, 0u);
      for (int i = 0; i < len; ++i) prod[i] = g[p0 + i] * prod[i];
    }
    accum_channels(acc, prod, p0, len, a.C, a.chan_stride);
  }
}

static void k_std_gsum(const PointArgs& a, int64_t begin, int64_t end, double* acc) {
  if (a.dtype == kF32) {
    std_gsum_f32(a, begin, end, acc);
    return;
  }
  PointArgs r = a;  // 16-bit: cd_step's grad_sigma pass (regenerated eps), no other outputs
  r.gx = r.gf = nullptr;
  r.want_gsigma = true;
  if (a.dtype == kF16) step_bwd_t<F16, false>(r, begin, end, acc);
  else step_bwd_t<BF16, false>(r, begin, end, acc);
}

static void k_normals16_of_words(const uint32_t* w, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) word_to_normals16_fast(w[i], &out[2 * i], &out[2 * i + 1]);
}

static const KernelTable table = {
    CDK_ISA_NAME,   k_philox_words, k_uniform,       k_normal,  k_cd_step_fwd,
    k_cd_step_bwd,  k_cd_smooth_fwd, k_cd_smooth_bwd, k_ens_fwd, k_ens_bwd,
    k_z_moments,    k_z_std_bwd,    k_std_gsum,     k_normals16_of_words,
};

}  // namespace CDK_ISA_NS
