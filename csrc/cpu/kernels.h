// kernels.h -- the CPU backend's entry points (called by csrc/bindings.cpp).
//
// Every function works on flat, contiguous buffers given as raw pointers, splits the work over
// `nthreads` threads (std::thread; small inputs run on the calling thread) and calls the
// kernels of the SIMD level chosen at run time (baseline, avx2 or avx512 on x86-64; baseline
// elsewhere). The per-thread ranges are fixed by (n, nthreads), so results - including the
// double-precision grad_sigma reductions - are deterministic for a given thread count.
#pragma once
#include <stdint.h>

#include <string>
#include <vector>

#include "cpu/cpu_common.h"

namespace cdk_cpu {

// SIMD level selection. The initial level is the best the CPU supports, or the one forced by
// the environment variable CDK_CPU_SIMD=baseline|avx2|avx512 (an unknown or unsupported value
// falls back to the best level and is reported by simd_note()).
const char* simd_level();
std::string simd_note();
std::vector<std::string> simd_levels_compiled();
std::vector<std::string> simd_levels_supported();
// Switch level at run time (tests); returns false (and changes nothing) if the level is not
// compiled in or the CPU lacks it.
bool set_simd_level(const std::string& name);

void philox_words(int32_t* out, int64_t n_blocks, uint64_t seed, uint64_t offset,
                  uint32_t sample, int nthreads);
void uniform(float* out, int64_t n, uint64_t seed, uint64_t offset, uint32_t sample,
             int nthreads);
// The 16-bit stream's float32 normals (before the 16-bit rounding) of n given words, at the
// current SIMD level, one thread: a window for tests on what the kernels compute.
void normals16_of_words(const uint32_t* w, float* out, int64_t n);
void normal(void* out, int dtype, int64_t n, uint64_t seed, uint64_t offset, uint32_t sample,
            int nthreads);
void cd_step_fwd(const PointArgs& a, int64_t n, int nthreads);
// gs_scale == 0: grad_sigma[c] += sum; else grad_sigma[c] = float(sum) * gs_scale (overwrite).
void cd_step_bwd(const PointArgs& a, int64_t n, float* grad_sigma, int nthreads,
                 float gs_scale = 0.0f);
void cd_smooth_fwd(const PointArgs& a, int64_t n, int nthreads);
void cd_smooth_bwd(const PointArgs& a, int64_t n, float* grad_sigma, int nthreads);
// std-scaled step. z_stats: out[0] = mean(z), out[1] = std(z) (unbiased; nan for n = 1) of
// z = x + dt*f in float32, accumulated in double around the shift z[0] (no cancellation when
// |mean| >> std). z_std_bwd: grad_x = gy + za*(z - zmean) + zb, grad_f = dt*grad_x.
void z_stats(const PointArgs& a, int64_t n, double* out, int nthreads);
void z_std_bwd(const PointArgs& a, int64_t n, int nthreads);
// The whole std step per direction, one call each (coef: float32 [a.C], one per channel of
// a.chan_stride elements, or a.C = 1). std_step_fwd: stats = (mean, std) of z (z_stats), then
// y = z + coef_c std eps (cd_step's stream, sigma_c = coef_c std / sqrt(dt)).
// std_step_bwd: a.gy = dL/dy, a.yv = y (or null: eps regenerated), a.x, a.f; writes
// grad_coef[c] = dL/dcoef_c when not null, and a.gx (= dL/dx) and a.gf (= dt dL/dx; may be
// null) when need_xf.
void std_step_fwd(const PointArgs& a, int64_t n, double dt, const float* coef, double* stats,
                  int nthreads);
void std_step_bwd(const PointArgs& a, int64_t n, double dt, const float* coef, double mean,
                  double sd, float* grad_coef, bool need_xf, int nthreads);
void ensemble_mean_fwd(const EnsArgs& a, int nthreads);
void ensemble_mean_bwd(const EnsArgs& a, int nthreads);

}  // namespace cdk_cpu
