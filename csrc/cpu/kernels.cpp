// kernels.cpp -- SIMD clones of kernels_impl.h, run-time dispatch and threading.
#include "cpu/kernels.h"
#include "cpu/pool.h"

#include <stdlib.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CDK_X86_CLONES 1
#else
#define CDK_X86_CLONES 0
#endif
#if CDK_X86_CLONES
#include <immintrin.h>  // the clones' Philox rounds (kernels_impl.h: philox_soa)
#endif

// ---- the clones -------------------------------------------------------------------------------
// kernels_impl.h's 16-float vector helpers are always_inline: the "vector return changes the
// ABI" note GCC gives for them in the narrower clones concerns calls that never exist.
#pragma GCC diagnostic ignored "-Wpsabi"
#define CDK_ISA_NS isa_baseline
#define CDK_ISA_NAME "baseline"
#define CDK_ISA_LEVEL 0
#include "cpu/kernels_impl.h"
#undef CDK_ISA_NS
#undef CDK_ISA_NAME
#undef CDK_ISA_LEVEL

#if CDK_X86_CLONES
// GCC 12's AVX-512 intrinsic headers trip its own -W(maybe-)uninitialized (_mm512_undefined_*)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define CDK_ISA_NS isa_avx2
#define CDK_ISA_NAME "avx2"
#define CDK_ISA_LEVEL 1
#include "cpu/kernels_impl.h"
#undef CDK_ISA_NS
#undef CDK_ISA_NAME
#undef CDK_ISA_LEVEL
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,prefer-vector-width=512")
#define CDK_ISA_NS isa_avx512
#define CDK_ISA_NAME "avx512"
#define CDK_ISA_LEVEL 2
#include "cpu/kernels_impl.h"
#undef CDK_ISA_NS
#undef CDK_ISA_NAME
#undef CDK_ISA_LEVEL
#pragma GCC pop_options
#pragma GCC diagnostic pop
#endif

namespace cdk_cpu {

// ---- SIMD level -------------------------------------------------------------------------------
namespace {

const KernelTable* table_for(const std::string& name) {
  if (name == "baseline") return &isa_baseline::table;
#if CDK_X86_CLONES
  if (name == "avx2") return &isa_avx2::table;
  if (name == "avx512") return &isa_avx512::table;
#endif
  return nullptr;
}

bool cpu_has(const std::string& name) {
  if (name == "baseline") return true;
#if CDK_X86_CLONES
  __builtin_cpu_init();
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (name == "avx512")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#endif
  return false;
}

struct Level {
  std::atomic<const KernelTable*> table{nullptr};
  std::string note;
  Level() {
    const KernelTable* best = &isa_baseline::table;
    for (const char* n : {"avx2", "avx512"})
      if (table_for(n) && cpu_has(n)) best = table_for(n);
    const KernelTable* chosen = best;
    const char* env = getenv("CDK_CPU_SIMD");
    if (env && *env) {
      const std::string want(env);
      if (!table_for(want)) {
        note = "CDK_CPU_SIMD=" + want + " is not a compiled level; using " + best->name;
      } else if (!cpu_has(want)) {
        note = "CDK_CPU_SIMD=" + want + " is not supported by this CPU; using " + best->name;
      } else {
        chosen = table_for(want);
        note = "forced by CDK_CPU_SIMD";
      }
    }
    table.store(chosen);
  }
};

Level& level() {
  static Level l;
  return l;
}

inline const KernelTable& K() { return *level().table.load(std::memory_order_relaxed); }

// ---- threading ------------------------------------------------------------------------------
// A parallel job: `tasks` contiguous ranges of [0, n) (inner bounds multiples of `align`) run on
// `threads` threads of the persistent pool (pool.h). The split depends only on (n, align, tasks)
// and per-range partial sums are combined in range order, so results are deterministic for a
// given thread count.
struct Split {
  int threads = 1, tasks = 1;
};

template <class F>
void parallel_for(int64_t n, int64_t align, Split sp, F&& fn) {
  if (n <= 0) return;
  const int nt = sp.tasks;
  if (nt <= 1) { fn(0, (int64_t)0, n); return; }
  const int64_t units = (n + align - 1) / align;
  auto bound = [&](int t) -> int64_t {
    if (t >= nt) return n;
    const int64_t b = (int64_t)(((__int128)units * t) / nt) * align;
    return b < n ? b : n;
  };
  pool_run(nt, sp.threads, [&](int t) { fn(t, bound(t), bound(t + 1)); });
}

// Threads worth using for `work` element-operations: waking a parked pool worker costs a few
// microseconds (starting a thread cost ~50 us), so 32K element-operations per thread are enough.
// Each thread gets up to 4 tasks (>= 32K element-operations each): if the OS runs a helper late
// (a loaded machine), the caller works through the unclaimed tasks instead of waiting.
Split threads_for(double work, int nthreads) {
  const double min_work = 8192.0;
  Split sp;
  int nt = nthreads < 1 ? 1 : nthreads;
  const double cap = work / min_work;
  if (cap < nt) nt = cap < 1.0 ? 1 : (int)cap;
  sp.threads = nt;
  if (nt > 1) {
    const double tasks = cap < 4.0 * nt ? cap : 4.0 * nt;
    sp.tasks = tasks < nt ? nt : (int)tasks;
  }
  return sp;
}

constexpr int64_t kAlign = 64;  // element ranges start at multiples of 64 (whole cache lines)

// Per-thread double sums -> grad_sigma (in thread order: deterministic).
struct ChannelSums {
  int64_t C;
  std::vector<double> v;
  ChannelSums(int nt, int64_t C_) : C(C_), v((size_t)nt * (size_t)C_, 0.0) {}
  double* of(int t) { return v.data() + (size_t)t * (size_t)C; }
  // scale == 0: out[c] += sum; else out[c] = float(sum) * scale (the rounding of a float32
  // sum followed by a float32 multiply, as the zero-fill + add + mul_ path computes it).
  void add_into(float* out, int nt, float scale = 0.0f) {
    for (int64_t c = 0; c < C; ++c) {
      double s = 0.0;
      for (int t = 0; t < nt; ++t) s += v[(size_t)t * (size_t)C + (size_t)c];
      if (scale == 0.0f) out[c] += (float)s;
      else out[c] = (float)s * scale;
    }
  }
};

}  // namespace

const char* simd_level() { return K().name; }
std::string simd_note() { return level().note; }

std::vector<std::string> simd_levels_compiled() {
#if CDK_X86_CLONES
  return {"baseline", "avx2", "avx512"};
#else
  return {"baseline"};
#endif
}

std::vector<std::string> simd_levels_supported() {
  std::vector<std::string> r;
  for (const auto& n : simd_levels_compiled())
    if (cpu_has(n)) r.push_back(n);
  return r;
}

bool set_simd_level(const std::string& name) {
  const KernelTable* t = table_for(name);
  if (!t || !cpu_has(name)) return false;
  level().table.store(t);
  return true;
}

// ---- entry points ---------------------------------------------------------------------------
void philox_words(int32_t* out, int64_t n_blocks, uint64_t seed, uint64_t offset,
                  uint32_t sample, int nthreads) {
  const KernelTable& k = K();
  parallel_for(n_blocks, 16, threads_for(4.0 * n_blocks, nthreads),
               [&](int, int64_t b0, int64_t b1) { k.philox_words(out, b0, b1, seed, offset, sample); });
}

void uniform(float* out, int64_t n, uint64_t seed, uint64_t offset, uint32_t sample,
             int nthreads) {
  const KernelTable& k = K();
  parallel_for(n, kAlign, threads_for((double)n, nthreads),
               [&](int, int64_t b0, int64_t b1) { k.uniform(out, b0, b1, seed, offset, sample); });
}

void normals16_of_words(const uint32_t* w, float* out, int64_t n) {
  K().normals16_of_words(w, out, n);
}

void normal(void* out, int dtype, int64_t n, uint64_t seed, uint64_t offset, uint32_t sample,
            int nthreads) {
  const KernelTable& k = K();
  parallel_for(n, kAlign, threads_for(2.0 * n, nthreads), [&](int, int64_t b0, int64_t b1) {
    k.normal(out, dtype, b0, b1, seed, offset, sample);
  });
}

void cd_step_fwd(const PointArgs& a, int64_t n, int nthreads) {
  const KernelTable& k = K();
  parallel_for(n, kAlign, threads_for(2.0 * n, nthreads),
               [&](int, int64_t b0, int64_t b1) { k.cd_step_fwd(a, b0, b1); });
}

void cd_step_bwd(const PointArgs& a, int64_t n, float* grad_sigma, int nthreads,
                 float gs_scale) {
  const KernelTable& k = K();
  PointArgs args = a;
  args.want_gsigma = grad_sigma != nullptr;
  const Split sp = threads_for((args.want_gsigma ? 2.0 : 0.5) * n, nthreads);
  ChannelSums sums(sp.tasks, args.want_gsigma ? a.C : 0);
  parallel_for(n, kAlign, sp, [&](int t, int64_t b0, int64_t b1) {
    k.cd_step_bwd(args, b0, b1, args.want_gsigma ? sums.of(t) : nullptr);
  });
  if (args.want_gsigma) sums.add_into(grad_sigma, sp.tasks, gs_scale);
}

void cd_smooth_fwd(const PointArgs& a, int64_t n, int nthreads) {
  const KernelTable& k = K();
  parallel_for(n, kAlign, threads_for(2.0 * (double)n * (double)a.samples, nthreads),
               [&](int, int64_t b0, int64_t b1) { k.cd_smooth_fwd(a, b0, b1); });
}

void cd_smooth_bwd(const PointArgs& a, int64_t n, float* grad_sigma, int nthreads) {
  const KernelTable& k = K();
  PointArgs args = a;
  args.want_gsigma = grad_sigma != nullptr;
  const Split sp = threads_for(2.0 * (double)n * (double)a.samples, nthreads);
  ChannelSums sums(sp.tasks, args.want_gsigma ? a.C : 0);
  parallel_for(n, kAlign, sp, [&](int t, int64_t b0, int64_t b1) {
    k.cd_smooth_bwd(args, b0, b1, args.want_gsigma ? sums.of(t) : nullptr);
  });
  if (args.want_gsigma) sums.add_into(grad_sigma, sp.tasks);
}

void z_stats(const PointArgs& a, int64_t n, double* out, int nthreads) {
  const KernelTable& k = K();
  if (n <= 0) { out[0] = out[1] = __builtin_nan(""); return; }
  PointArgs args = a;
  double z0[2] = {0.0, 0.0};
  args.zshift = 0.0f;
  k.z_moments(args, 0, 1, z0);  // the sum over element 0 alone is z[0]
  args.zshift = (float)z0[0];
  const Split sp = threads_for(1.0 * n, nthreads);
  std::vector<double> part((size_t)sp.tasks * 2, 0.0);
  parallel_for(n, kAlign, sp, [&](int t, int64_t b0, int64_t b1) {
    k.z_moments(args, b0, b1, part.data() + 2 * t);
  });
  double s1 = 0.0, s2 = 0.0;
  for (int t = 0; t < sp.tasks; ++t) { s1 += part[2 * t]; s2 += part[2 * t + 1]; }
  const double nd = (double)n;
  double var = (s2 - s1 * s1 / nd) / (nd - 1.0);
  if (var < 0.0) var = 0.0;
  out[0] = (double)args.zshift + s1 / nd;
  out[1] = n > 1 ? __builtin_sqrt(var) : __builtin_nan("");
}

void z_std_bwd(const PointArgs& a, int64_t n, int nthreads) {
  const KernelTable& k = K();
  parallel_for(n, kAlign, threads_for(1.0 * n, nthreads),
               [&](int, int64_t b0, int64_t b1) { k.z_std_bwd(a, b0, b1); });
}

// sigma_c = float32(coef_c * float32(sd / sqrt(dt))): the kernel sigma of the std step (the
// float32 product std_step.py's _sigma_eff_host computes for the other backends).
static std::vector<float> std_sigma(const float* coef, int64_t Cc, double sd, double dt) {
  const float sdv = (float)(sd / std::sqrt(dt));
  std::vector<float> sig((size_t)Cc);
  for (int64_t c = 0; c < Cc; ++c) sig[(size_t)c] = coef[c] * sdv;
  return sig;
}

void std_step_fwd(const PointArgs& a, int64_t n, double dt, const float* coef, double* stats,
                  int nthreads) {
  z_stats(a, n, stats, nthreads);
  const std::vector<float> sig = std_sigma(coef, a.C, stats[1], dt);
  PointArgs b = a;
  b.sigma = sig.data();
  b.act = kNone;
  cd_step_fwd(b, n, nthreads);
}

void std_step_bwd(const PointArgs& a, int64_t n, double dt, const float* coef, double mean,
                  double sd, float* grad_coef, bool need_xf, int nthreads) {
  const KernelTable& k = K();
  const std::vector<float> sig = std_sigma(coef, a.C, sd, dt);
  PointArgs b = a;
  b.sigma = sig.data();
  b.y_guard = 64.0f;  // (eps read back from y where |y| < 64 s: kernels_impl.h)
  // pass 1: gs_c = sqrt(dt) sum_{i in c} g_i eps_i = dL/dsigma_c (float32, as cd_step's)
  const Split sp = threads_for(2.0 * n, nthreads);
  ChannelSums sums(sp.tasks, a.C);
  parallel_for(n, kAlign, sp, [&](int t, int64_t b0, int64_t b1) { k.std_gsum(b, b0, b1, sums.of(t)); });
  std::vector<float> gs((size_t)a.C);
  sums.add_into(gs.data(), sp.tasks, (float)std::sqrt(dt));
  const double inv = 1.0 / std::sqrt(dt);
  if (grad_coef) {  // dL/dcoef_c = gs_c * std / sqrt(dt)
    const float scale = (float)(sd * inv);
    for (int64_t c = 0; c < a.C; ++c) grad_coef[c] = gs[(size_t)c] * scale;
  }
  if (!need_xf) return;
  // pass 2: dL/dx = g + dL/dstd (z - mean) / ((n - 1) std), dL/dstd = sum_c coef_c gs_c / sqrt(dt)
  double gstd = 0.0;
  for (int64_t c = 0; c < a.C; ++c) gstd += (double)gs[(size_t)c] * (double)coef[c];
  gstd *= inv;
  PointArgs w = a;
  w.zmean = (float)mean;
  w.za = (float)(gstd / (((double)n - 1.0) * sd));
  w.zb = 0.0f;
  z_std_bwd(w, n, nthreads);
}

// Rows b of the ensemble split over threads, each with its own float scratch of 5*Cp + K + 16 (Cp = C rounded up to 16).
template <class RowFn>
static void ensemble_rows(const EnsArgs& a, int nthreads, RowFn&& rows) {
  Split sp = threads_for(3.0 * (double)a.K * (double)a.B * (double)a.C, nthreads);
  const int64_t Bmax = a.B > 0 ? a.B : 1;
  if (sp.tasks > Bmax) sp.tasks = (int)Bmax;
  if (sp.threads > sp.tasks) sp.threads = sp.tasks;
  const int64_t Cp = (a.C + 15) & ~(int64_t)15;  // rows padded to whole 16-lane vectors
  const size_t per = (size_t)(5 * Cp + a.K + 16);
  std::vector<float> scratch(per * (size_t)sp.tasks);  // here: bad_alloc reaches Python
  parallel_for(a.B, 1, sp, [&](int t, int64_t b0, int64_t b1) {
    rows(b0, b1, scratch.data() + per * (size_t)t);
  });
}

void ensemble_mean_fwd(const EnsArgs& a, int nthreads) {
  const KernelTable& k = K();
  ensemble_rows(a, nthreads, [&](int64_t b0, int64_t b1, float* s) { k.ens_fwd(a, b0, b1, s); });
}

void ensemble_mean_bwd(const EnsArgs& a, int nthreads) {
  const KernelTable& k = K();
  ensemble_rows(a, nthreads, [&](int64_t b0, int64_t b1, float* s) { k.ens_bwd(a, b0, b1, s); });
}

}  // namespace cdk_cpu
