// bindings.cpp -- the `cdkernels._C` extension module.
//
// Deliberately torch-free: no torch headers, no libtorch link. Tensors cross this boundary as
// raw data pointers (uintptr_t from tensor.data_ptr()), element counts and dtype codes
// (0 float32, 1 float16, 2 bfloat16); CUDA calls take the stream handle as an integer. The
// module therefore imports on any machine (no GPU driver needed: the CUDA runtime is linked
// statically and only touched when a CUDA function is called).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cpu/kernels.h"
#include "cpu/pool.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifdef CDK_WITH_CUDA
void cdk_register_cuda(pybind11::module_& m);
#endif

#ifndef CDK_CUDA_ARCHS
#define CDK_CUDA_ARCHS ""
#endif

namespace py = pybind11;
using namespace cdk_cpu;

namespace {

int check_dtype(int dtype) {
  if (dtype != kF32 && dtype != kF16 && dtype != kBF16)
    throw std::invalid_argument("cdkernels._C: dtype code must be 0 (float32), 1 (float16) or "
                                "2 (bfloat16), got " + std::to_string(dtype));
  return dtype;
}

int parse_act(const std::string& s) {
  if (s == "none") return kNone;
  if (s == "relu") return kRelu;
  if (s == "gelu") return kGelu;
  if (s == "tanh") return kTanh;
  if (s == "sigmoid") return kSigmoid;
  if (s == "softplus") return kSoftplus;
  throw std::invalid_argument("cdkernels._C: unknown activation '" + s + "'");
}

int parse_space(const std::string& s) {
  if (s == "prob") return kProb;
  if (s == "logit") return kLogit;
  if (s == "logprob") return kLogprob;
  throw std::invalid_argument("cdkernels._C: unknown space '" + s + "'");
}

template <class T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

uint64_t read_seed(uintptr_t seed_ptr) {
  if (!seed_ptr) throw std::invalid_argument("cdkernels._C: null seed pointer");
  int64_t s;
  std::memcpy(&s, ptr<const void>(seed_ptr), sizeof(s));
  return (uint64_t)s;
}

void fill_sigma(PointArgs& a, uintptr_t sigma_ptr, double sigma_value, int64_t C,
                int64_t chan_stride) {
  if (C < 1 || chan_stride < 1)
    throw std::invalid_argument("cdkernels._C: C and chan_stride must be >= 1");
  a.sigma = sigma_ptr ? ptr<const float>(sigma_ptr) : nullptr;
  a.sigma_value = (float)sigma_value;
  a.C = C;
  a.chan_stride = chan_stride;
}

// The arguments both std_step entries share: dtype, dt (> 0) and sqrt(dt), coef as the
// per-channel sigma array (the entries turn it into sigma), seed and offset.
PointArgs std_step_args(int dtype, double dt, uintptr_t coef, int64_t C, int64_t chan_stride,
                        uintptr_t seed, uint64_t offset) {
  PointArgs a;
  a.dtype = check_dtype(dtype);
  if (!(dt > 0.0)) throw std::invalid_argument("cdkernels._C: std_step needs dt > 0");
  a.dt = (float)dt;
  a.sqrt_dt = (float)std::sqrt(dt);
  fill_sigma(a, coef, 0.0, C, chan_stride);
  a.seed = read_seed(seed);
  a.offset = offset;
  return a;
}

const char* compiler_string() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " __VERSION__;
#else
  return "unknown";
#endif
}

}  // namespace

// A fresh multi-MB output is first touched by our kernel. With 4 KB pages that is one page
// fault per 4 KB: on the 2-core dev VM about 20 ms for a 64 MB output, twice the time of the
// cd_step kernel itself. Advising transparent huge pages for the 2 MB-aligned interior cuts the
// faults 512-fold (measured 30.8 -> 13.6 ms for a 16M-element cd_step). Advisory only: where
// THP is off or the call fails, nothing changes.
void advise_huge_pages(uintptr_t ptr, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = (uintptr_t)2 << 20;
  if (bytes < (int64_t)(4 * huge)) return;
  const uintptr_t begin = (ptr + huge - 1) & ~(huge - 1);
  const uintptr_t end = (ptr + (uintptr_t)bytes) & ~(huge - 1);
  if (end > begin) (void)madvise((void*)begin, end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "cdkernels compiled kernels (CPU backend; CUDA backend when built with nvcc)";

  m.def("advise_huge_pages", &advise_huge_pages, py::arg("ptr"), py::arg("bytes"),
        "Advise transparent huge pages for the 2 MB-aligned interior of an output buffer "
        "(Linux; no-op below 8 MB or elsewhere).");

  m.def("cpu_simd_level", []() { return std::string(simd_level()); },
        "The SIMD level the CPU kernels use: 'baseline', 'avx2' or 'avx512'.");
  m.def("_set_cpu_simd_level", [](const std::string& name) {
        if (!set_simd_level(name))
          throw std::invalid_argument("cdkernels._C: SIMD level '" + name +
                                      "' is not compiled in or not supported by this CPU");
      }, "Switch the CPU SIMD level (testing only).");
  m.def("cpu_threading", []() { return cpu_threading(); },
        "Who runs the CPU kernels' helper threads: 'openmp (<runtime path>)' (torch's OpenMP "
        "threads) or 'pool' (cdkernels' own persistent pool).");
  m.def("_set_cpu_threading", [](const std::string& mode) {
        if (!set_cpu_threading(mode))
          throw std::invalid_argument("cdkernels._C: CPU threading mode must be 'auto', "
                                      "'openmp' or 'pool', got '" + mode + "'");
      }, "Switch the CPU threading mode (testing only).");
  m.def("cpu_simd_levels", []() { return simd_levels_supported(); },
        "The SIMD levels compiled in that this CPU supports.");

  m.def("build_info", []() {
    py::dict d;
#ifdef CDK_WITH_CUDA
    d["with_cuda"] = true;
#else
    d["with_cuda"] = false;
#endif
    py::list archs;
    std::string s = CDK_CUDA_ARCHS;
    size_t i = 0;
    while (i < s.size()) {
      size_t j = s.find(',', i);
      if (j == std::string::npos) j = s.size();
      if (j > i) archs.append(s.substr(i, j - i));
      i = j + 1;
    }
    d["cuda_archs"] = archs;
    d["simd_levels"] = simd_levels_compiled();
    d["simd_levels_supported"] = simd_levels_supported();
    d["simd_level"] = std::string(simd_level());
    d["simd_note"] = simd_note();
    d["compiler"] = std::string(compiler_string());
    return d;
  });

  // -- noise ----------------------------------------------------------------------------------
  m.def("philox_words", [](uintptr_t out, int64_t n_blocks, uintptr_t seed, uint64_t offset,
                           uint32_t sample, int nthreads) {
        const uint64_t s = read_seed(seed);
        py::gil_scoped_release nogil;
        philox_words(ptr<int32_t>(out), n_blocks, s, offset, sample, nthreads);
      }, py::arg("out"), py::arg("n_blocks"), py::arg("seed"), py::arg("offset"),
      py::arg("sample"), py::arg("nthreads"));

  m.def("normals16_of_words", [](uintptr_t words, uintptr_t out, int64_t n) {
        py::gil_scoped_release nogil;
        normals16_of_words(ptr<const uint32_t>(words), ptr<float>(out), n);
      }, py::arg("words"), py::arg("out"), py::arg("n"),
      "float32 [2n]: the 16-bit stream's normals of n uint32 words before the 16-bit rounding, "
      "as the CPU kernels compute them at the current SIMD level (for tests)");

  m.def("uniform", [](uintptr_t out, int64_t n, uintptr_t seed, uint64_t offset,
                      uint32_t sample, int nthreads) {
        const uint64_t s = read_seed(seed);
        py::gil_scoped_release nogil;
        uniform(ptr<float>(out), n, s, offset, sample, nthreads);
      }, py::arg("out"), py::arg("n"), py::arg("seed"), py::arg("offset"), py::arg("sample"),
      py::arg("nthreads"));

  m.def("normal", [](uintptr_t out, int64_t n, int dtype, uintptr_t seed, uint64_t offset,
                     uint32_t sample, int nthreads) {
        check_dtype(dtype);
        const uint64_t s = read_seed(seed);
        py::gil_scoped_release nogil;
        normal(ptr<void>(out), dtype, n, s, offset, sample, nthreads);
      }, py::arg("out"), py::arg("n"), py::arg("dtype"), py::arg("seed"), py::arg("offset"),
      py::arg("sample"), py::arg("nthreads"));

  // -- cd_step --------------------------------------------------------------------------------
  m.def("cd_step_fwd", [](uintptr_t x, uintptr_t f, uintptr_t y, int64_t n, int dtype,
                          double dt, uintptr_t sigma, double sigma_value, int64_t C,
                          int64_t chan_stride, uintptr_t seed, uint64_t offset,
                          const std::string& act, int nthreads) {
        PointArgs a;
        a.dtype = check_dtype(dtype);
        a.act = parse_act(act);
        if (a.act != kNone && a.act != kRelu)
          throw std::invalid_argument("cdkernels._C: cd_step supports act 'none' and 'relu'");
        a.x = ptr<const void>(x); a.f = ptr<const void>(f); a.y = ptr<void>(y);
        a.dt = (float)dt;
        a.sqrt_dt = (float)std::sqrt(dt);
        a.noise_scale = (float)(sigma_value * std::sqrt(dt));
        fill_sigma(a, sigma, sigma_value, C, chan_stride);
        a.seed = read_seed(seed);
        a.offset = offset;
        py::gil_scoped_release nogil;
        cd_step_fwd(a, n, nthreads);
      }, py::arg("x"), py::arg("f"), py::arg("y"), py::arg("n"), py::arg("dtype"), py::arg("dt"),
      py::arg("sigma"), py::arg("sigma_value"), py::arg("C"), py::arg("chan_stride"),
      py::arg("seed"), py::arg("offset"), py::arg("act"), py::arg("nthreads"));

  m.def("cd_step_bwd", [](uintptr_t grad_y, uintptr_t y, uintptr_t grad_x, uintptr_t grad_f,
                          uintptr_t grad_sigma, int64_t n, int dtype, double dt, uintptr_t sigma,
                          double sigma_value, int64_t C, int64_t chan_stride, uintptr_t seed,
                          uint64_t offset, const std::string& act, int nthreads,
                          double gs_scale) {
        PointArgs a;
        a.dtype = check_dtype(dtype);
        a.act = parse_act(act);
        if (a.act != kNone && a.act != kRelu)
          throw std::invalid_argument("cdkernels._C: cd_step supports act 'none' and 'relu'");
        if (a.act == kRelu && !y)
          throw std::invalid_argument("cdkernels._C: cd_step_bwd with relu needs y");
        a.gy = ptr<const void>(grad_y); a.yv = ptr<const void>(y);
        a.gx = grad_x ? ptr<void>(grad_x) : nullptr;
        a.gf = grad_f ? ptr<void>(grad_f) : nullptr;
        a.dt = (float)dt;
        a.sqrt_dt = (float)std::sqrt(dt);
        fill_sigma(a, sigma, sigma_value, C, chan_stride);
        a.seed = read_seed(seed);
        a.offset = offset;
        py::gil_scoped_release nogil;
        cd_step_bwd(a, n, grad_sigma ? ptr<float>(grad_sigma) : nullptr, nthreads,
                    (float)gs_scale);
      }, py::arg("grad_y"), py::arg("y"), py::arg("grad_x"), py::arg("grad_f"),
      py::arg("grad_sigma"), py::arg("n"), py::arg("dtype"), py::arg("dt"), py::arg("sigma"),
      py::arg("sigma_value"), py::arg("C"), py::arg("chan_stride"), py::arg("seed"),
      py::arg("offset"), py::arg("act"), py::arg("nthreads"), py::arg("gs_scale") = 0.0,
      "gs_scale == 0: grad_sigma[c] += sum (caller zero-fills); else grad_sigma[c] = "
      "float(sum) * float(gs_scale) (overwrites: no zero-fill, no separate scale op).");

  // -- cd_smooth ------------------------------------------------------------------------------
  m.def("cd_smooth_fwd", [](uintptr_t x, uintptr_t y, int64_t n, int dtype, uintptr_t sigma,
                            double sigma_value, int64_t C, int64_t chan_stride, int64_t samples,
                            uintptr_t seed, uint64_t offset, const std::string& act,
                            int nthreads) {
        PointArgs a;
        a.dtype = check_dtype(dtype);
        a.act = parse_act(act);
        if (samples < 1) throw std::invalid_argument("cdkernels._C: samples must be >= 1");
        a.x = ptr<const void>(x); a.y = ptr<void>(y);
        fill_sigma(a, sigma, sigma_value, C, chan_stride);
        a.samples = samples;
        a.seed = read_seed(seed);
        a.offset = offset;
        py::gil_scoped_release nogil;
        cd_smooth_fwd(a, n, nthreads);
      }, py::arg("x"), py::arg("y"), py::arg("n"), py::arg("dtype"), py::arg("sigma"),
      py::arg("sigma_value"), py::arg("C"), py::arg("chan_stride"), py::arg("samples"),
      py::arg("seed"), py::arg("offset"), py::arg("act"), py::arg("nthreads"));

  m.def("cd_smooth_bwd", [](uintptr_t grad_y, uintptr_t x, uintptr_t grad_x,
                            uintptr_t grad_sigma, int64_t n, int dtype, uintptr_t sigma,
                            double sigma_value, int64_t C, int64_t chan_stride, int64_t samples,
                            uintptr_t seed, uint64_t offset, const std::string& act,
                            int nthreads) {
        PointArgs a;
        a.dtype = check_dtype(dtype);
        a.act = parse_act(act);
        if (samples < 1) throw std::invalid_argument("cdkernels._C: samples must be >= 1");
        a.gy = ptr<const void>(grad_y); a.x = ptr<const void>(x); a.gx = ptr<void>(grad_x);
        fill_sigma(a, sigma, sigma_value, C, chan_stride);
        a.samples = samples;
        a.seed = read_seed(seed);
        a.offset = offset;
        py::gil_scoped_release nogil;
        cd_smooth_bwd(a, n, grad_sigma ? ptr<float>(grad_sigma) : nullptr, nthreads);
      }, py::arg("grad_y"), py::arg("x"), py::arg("grad_x"), py::arg("grad_sigma"), py::arg("n"),
      py::arg("dtype"), py::arg("sigma"), py::arg("sigma_value"), py::arg("C"),
      py::arg("chan_stride"), py::arg("samples"), py::arg("seed"), py::arg("offset"),
      py::arg("act"), py::arg("nthreads"));

  // -- std-scaled step ------------------------------------------------------------------------
  m.def("z_stats", [](uintptr_t x, uintptr_t f, int64_t n, int dtype, double dt, uintptr_t out,
                      int nthreads) {
        PointArgs a;
        a.dtype = check_dtype(dtype);
        a.x = ptr<const void>(x); a.f = ptr<const void>(f);
        a.dt = (float)dt;
        py::gil_scoped_release nogil;
        z_stats(a, n, ptr<double>(out), nthreads);
      }, py::arg("x"), py::arg("f"), py::arg("n"), py::arg("dtype"), py::arg("dt"),
      py::arg("out"), py::arg("nthreads"),
      "out float64 [2] = (mean, unbiased std) of z = x + dt*f (float32 z, double sums).");
  m.def("z_std_bwd", [](uintptr_t x, uintptr_t f, uintptr_t grad_y, uintptr_t grad_x,
                        uintptr_t grad_f, int64_t n, int dtype, double dt, double mean, double za,
                        double zb, int nthreads) {
        PointArgs a;
        a.dtype = check_dtype(dtype);
        a.x = ptr<const void>(x); a.f = ptr<const void>(f);
        a.gy = grad_y ? ptr<const void>(grad_y) : nullptr;
        a.gx = ptr<void>(grad_x); a.gf = grad_f ? ptr<void>(grad_f) : nullptr;
        a.dt = (float)dt;
        a.zmean = (float)mean; a.za = (float)za; a.zb = (float)zb;
        py::gil_scoped_release nogil;
        z_std_bwd(a, n, nthreads);
      }, py::arg("x"), py::arg("f"), py::arg("grad_y"), py::arg("grad_x"), py::arg("grad_f"),
      py::arg("n"), py::arg("dtype"), py::arg("dt"), py::arg("mean"), py::arg("za"),
      py::arg("zb"), py::arg("nthreads"),
      "grad_x = grad_y + za*(z - mean) + zb, grad_f = dt*grad_x, z = x + dt*f (grad_y, grad_f "
      "optional).");

  m.def("std_step_fwd", [](uintptr_t x, uintptr_t f, uintptr_t y, int64_t n, int dtype,
                           double dt, uintptr_t coef, int64_t C, int64_t chan_stride,
                           uintptr_t seed, uint64_t offset, uintptr_t stats, int nthreads) {
        PointArgs a = std_step_args(dtype, dt, coef, C, chan_stride, seed, offset);
        a.x = ptr<const void>(x); a.f = ptr<const void>(f); a.y = ptr<void>(y);
        py::gil_scoped_release nogil;
        std_step_fwd(a, n, dt, ptr<const float>(coef), ptr<double>(stats), nthreads);
      }, py::arg("x"), py::arg("f"), py::arg("y"), py::arg("n"), py::arg("dtype"), py::arg("dt"),
      py::arg("coef"), py::arg("C"), py::arg("chan_stride"), py::arg("seed"), py::arg("offset"),
      py::arg("stats"), py::arg("nthreads"),
      "The std step forward in one call: stats (float64 [2]) = (mean, std) of z = x + dt*f, "
      "then y = z + coef_c*std*eps (coef float32 [C]).");
  m.def("std_step_bwd", [](uintptr_t grad_y, uintptr_t y, uintptr_t x, uintptr_t f,
                           uintptr_t grad_x, uintptr_t grad_f, uintptr_t grad_coef, int64_t n,
                           int dtype, double dt, uintptr_t coef, int64_t C, int64_t chan_stride,
                           uintptr_t seed, uint64_t offset, double mean, double sd,
                           int nthreads) {
        PointArgs a = std_step_args(dtype, dt, coef, C, chan_stride, seed, offset);
        if (n > 0 && !grad_x && !grad_coef)
          throw std::invalid_argument("cdkernels._C: std_step_bwd with no output");
        a.gy = ptr<const void>(grad_y); a.yv = y ? ptr<const void>(y) : nullptr;
        a.x = ptr<const void>(x); a.f = ptr<const void>(f);
        a.gx = grad_x ? ptr<void>(grad_x) : nullptr;
        a.gf = grad_f ? ptr<void>(grad_f) : nullptr;
        py::gil_scoped_release nogil;
        std_step_bwd(a, n, dt, ptr<const float>(coef), mean, sd,
                     grad_coef ? ptr<float>(grad_coef) : nullptr, grad_x != 0, nthreads);
      }, py::arg("grad_y"), py::arg("y"), py::arg("x"), py::arg("f"), py::arg("grad_x"),
      py::arg("grad_f"), py::arg("grad_coef"), py::arg("n"), py::arg("dtype"), py::arg("dt"),
      py::arg("coef"), py::arg("C"), py::arg("chan_stride"), py::arg("seed"), py::arg("offset"),
      py::arg("mean"), py::arg("sd"), py::arg("nthreads"),
      "The std step backward in one call: grad_coef[c] = dL/dcoef_c (float32 [C], optional), "
      "grad_x = dL/dx and grad_f = dt*grad_x (optional) when grad_x is given. y (optional) "
      "lets float32 read eps back instead of regenerating it.");

  // -- ensemble_mean --------------------------------------------------------------------------
  m.def("ensemble_mean_fwd", [](uintptr_t inp, uintptr_t out, int64_t K, int64_t B, int64_t C,
                                int dtype, const std::string& space, int nthreads) {
        EnsArgs a;
        a.dtype = check_dtype(dtype);
        a.space = parse_space(space);
        if (K < 1 || B < 0 || C < 1) throw std::invalid_argument("cdkernels._C: bad K/B/C");
        a.K = K; a.B = B; a.C = C;
        a.inp = ptr<const void>(inp); a.out = ptr<void>(out);
        py::gil_scoped_release nogil;
        ensemble_mean_fwd(a, nthreads);
      }, py::arg("inp"), py::arg("out"), py::arg("K"), py::arg("B"), py::arg("C"),
      py::arg("dtype"), py::arg("space"), py::arg("nthreads"));

  m.def("ensemble_mean_bwd", [](uintptr_t grad_out, uintptr_t inp, uintptr_t out,
                                uintptr_t grad_in, int64_t K, int64_t B, int64_t C, int dtype,
                                const std::string& space, int nthreads) {
        EnsArgs a;
        a.dtype = check_dtype(dtype);
        a.space = parse_space(space);
        if (K < 1 || B < 0 || C < 1) throw std::invalid_argument("cdkernels._C: bad K/B/C");
        a.K = K; a.B = B; a.C = C;
        a.gout = ptr<const void>(grad_out); a.inp = ptr<const void>(inp);
        a.outv = ptr<const void>(out); a.gin = ptr<void>(grad_in);
        py::gil_scoped_release nogil;
        ensemble_mean_bwd(a, nthreads);
      }, py::arg("grad_out"), py::arg("inp"), py::arg("out"), py::arg("grad_in"), py::arg("K"),
      py::arg("B"), py::arg("C"), py::arg("dtype"), py::arg("space"), py::arg("nthreads"));

#ifdef CDK_WITH_CUDA
  m.attr("with_cuda") = true;
  cdk_register_cuda(m);
#else
  m.attr("with_cuda") = false;
#endif
}
