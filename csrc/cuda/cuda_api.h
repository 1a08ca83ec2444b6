// cuda_api.h -- host launchers of the cdkernels CUDA kernels (csrc/cuda/*.cu).
//
// Plain C++ (no CUDA or torch headers), so csrc/cuda/bind_cuda.cpp can be compiled by g++.
// Conventions:
//   device   CUDA device index of the tensors; the launcher makes it current for the call and
//            restores the previous device afterwards.
//   stream   a cudaStream_t as an integer (torch.cuda.current_stream(dev).cuda_stream).
//   pointers raw device pointers as integers (tensor.data_ptr()); 0 means "absent" where a
//            parameter is optional.
//   seed     pointer to one int64 in device memory; kernels read it on the device.
//   dtype    0 float32, 1 float16, 2 bfloat16 (data tensors; sigma/grad_sigma are float32).
//   act      0 none, 1 relu, 2 gelu (exact), 3 tanh, 4 sigmoid, 5 softplus.
//   space    0 prob, 1 logit, 2 logprob.
// Every launcher is asynchronous on `stream` and throws std::runtime_error (kernel name and
// cudaGetErrorString) if a launch fails, std::invalid_argument on a bad code or size.
#pragma once
#include <stdint.h>

#include <string>

namespace cdk_cuda {

enum DTypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum ActCode : int { kActNone = 0, kActRelu = 1, kActGelu = 2, kActTanh = 3, kActSigmoid = 4,
                     kActSoftplus = 5 };
enum SpaceCode : int { kSpaceProb = 0, kSpaceLogit = 1, kSpaceLogprob = 2 };

// Number of CUDA devices; 0 (never an exception) when there is no driver or no device.
int device_count();
// Why device_count() is 0: 0 when cudaGetDeviceCount succeeds, else its cudaError_t code, with
// "cudaErrorName: description" in *what (cudaErrorInsufficientDriver (35): the driver is older
// than the CUDA runtime linked statically into this module; cudaErrorNoDevice (100): none).
int device_query_error(std::string* what);
// Runtime version this module was built against (CUDART_VERSION) and the driver's (0 if none).
int runtime_version();
int driver_version();

// -- noise stream (docs/noise.md) --------------------------------------------------------------
// out int32 [n]: out[4i+j] = word j of block offset+i.
void philox_words(int device, uintptr_t stream, uintptr_t out, int64_t n, uintptr_t seed,
                  uint64_t offset, uint32_t sample);
// out float32 [n]: U(word e%4 of block offset + e/4).
void uniform(int device, uintptr_t stream, uintptr_t out, int64_t n, uintptr_t seed,
             uint64_t offset, uint32_t sample);
// out dtype [n]: normal lane e%4 of block offset + e/4 (float32 values rounded to dtype).
void normal(int device, uintptr_t stream, int dtype, uintptr_t out, int64_t n, uintptr_t seed,
            uint64_t offset, uint32_t sample);

// -- cd_step: y = act(x + dt*f + s*sqrt(dt)*eps), act in {none, relu} ---------------------------
// sigma: float32 [C] or 0 (then sigma_value is used for every element).
void cd_step_fwd(int device, uintptr_t stream, int dtype, int64_t n, uintptr_t x, uintptr_t f,
                 uintptr_t y, double dt, uintptr_t sigma, double sigma_value, int64_t C,
                 int64_t chan_stride, uintptr_t seed, uint64_t offset, int act);
// gz = grad_y * (y > 0 if relu); grad_x = gz, grad_f = dt*gz, grad_sigma[c] += sum gz*eps.
// y may be 0 when act is none; grad_x, grad_f, grad_sigma may each be 0.
void cd_step_bwd(int device, uintptr_t stream, int dtype, int64_t n, uintptr_t grad_y,
                 uintptr_t y, uintptr_t grad_x, uintptr_t grad_f, uintptr_t grad_sigma, double dt,
                 int64_t C, int64_t chan_stride, uintptr_t seed, uint64_t offset, int act);

// -- cd_smooth: y = (1/K) sum_k act(x + s*eps_k), eps_k = stream (seed, offset, k) --------------
void cd_smooth_fwd(int device, uintptr_t stream, int dtype, int64_t n, uintptr_t x, uintptr_t y,
                   uintptr_t sigma, double sigma_value, int64_t C, int64_t chan_stride,
                   int64_t samples, uintptr_t seed, uint64_t offset, int act);
// grad_x = g*(1/K) sum_k act'(z_k); grad_sigma[c] += sum g*(1/K) sum_k act'(z_k)*eps_k.
void cd_smooth_bwd(int device, uintptr_t stream, int dtype, int64_t n, uintptr_t grad_y,
                   uintptr_t x, uintptr_t grad_x, uintptr_t grad_sigma, uintptr_t sigma,
                   double sigma_value, int64_t C, int64_t chan_stride, int64_t samples,
                   uintptr_t seed, uint64_t offset, int act);

// -- ensemble_mean: inp [K, B, C] contiguous -> out [B, C] contiguous (same dtype) -------------
void ensemble_mean_fwd(int device, uintptr_t stream, int dtype, uintptr_t inp, uintptr_t out,
                       int64_t K, int64_t B, int64_t C, int space);
// grad_in [K, B, C]; grad_out and out [B, C]; all of one dtype.
void ensemble_mean_bwd(int device, uintptr_t stream, int dtype, uintptr_t grad_out, uintptr_t inp,
                       uintptr_t out, uintptr_t grad_in, int64_t K, int64_t B, int64_t C,
                       int space);

// -- std-scaled step (std_step.cu): z = x + dt*f ------------------------------------------------
// out float64 [2] = (mean(z), unbiased std(z)); workspace: float64 [z_stats_workspace_doubles()]
// on the device (per-block partial sums). Deterministic (no atomics). n > 0.
int z_stats_workspace_doubles();
void z_stats(int device, uintptr_t stream, int dtype, int64_t n, uintptr_t x, uintptr_t f,
             double dt, uintptr_t workspace, uintptr_t out);
// coefs float64 [3] on the device = (mean, a, b): grad_x = grad_y + a*(z - mean) + b
// (grad_y 0: absent), grad_f = dt*grad_x (grad_f 0: not written).
void z_std_bwd(int device, uintptr_t stream, int dtype, int64_t n, uintptr_t x, uintptr_t f,
               uintptr_t grad_y, uintptr_t grad_x, uintptr_t grad_f, double dt,
               uintptr_t coefs);

}  // namespace cdk_cuda
