// activations.cuh -- the cd_smooth activations and their derivatives, float32, matching
// cdkernels/backends/reference.py (act_fwd / act_grad) formula by formula.
#pragma once
#include <cuda_runtime.h>

namespace cdk_cuda {

struct ActNone {
  __device__ __forceinline__ static float f(float z) { return z; }
  __device__ __forceinline__ static float d(float) { return 1.0f; }
};
struct ActRelu {  // clamp_min(z, 0); derivative (z > 0)
  __device__ __forceinline__ static float f(float z) { return z < 0.0f ? 0.0f : z; }
  __device__ __forceinline__ static float d(float z) { return z > 0.0f ? 1.0f : 0.0f; }
};
struct ActGelu {  // exact: 0.5 z (1 + erf(z / sqrt 2)); d = cdf + z * pdf
  __device__ __forceinline__ static float f(float z) {
    return __fmul_rn(__fmul_rn(0.5f, z), 1.0f + erff(__fmul_rn(z, 0.70710678118654752f)));
  }
  __device__ __forceinline__ static float d(float z) {
    const float cdf = __fmul_rn(0.5f, 1.0f + erff(__fmul_rn(z, 0.70710678118654752f)));
    const float pdf = __fmul_rn(expf(__fmul_rn(__fmul_rn(-0.5f, z), z)), 0.3989422804014327f);
    return __fadd_rn(cdf, __fmul_rn(z, pdf));
  }
};
struct ActTanh {
  __device__ __forceinline__ static float f(float z) { return tanhf(z); }
  __device__ __forceinline__ static float d(float z) {
    const float t = tanhf(z);
    return __fsub_rn(1.0f, __fmul_rn(t, t));
  }
};
__device__ __forceinline__ float sigmoid_f(float z) { return 1.0f / (1.0f + expf(-z)); }
struct ActSigmoid {
  __device__ __forceinline__ static float f(float z) { return sigmoid_f(z); }
  __device__ __forceinline__ static float d(float z) {
    const float s = sigmoid_f(z);
    return __fmul_rn(s, 1.0f - s);
  }
};
struct ActSoftplus {  // beta 1, stable: max(z, 0) + log1p(exp(-|z|)); derivative sigmoid(z)
  __device__ __forceinline__ static float f(float z) {
    return (z < 0.0f ? 0.0f : z) + log1pf(expf(-fabsf(z)));
  }
  __device__ __forceinline__ static float d(float z) { return sigmoid_f(z); }
};

#define CDK_DISPATCH_ACT(code, A, ...)                                                        \
  switch (code) {                                                                             \
    case ::cdk_cuda::kActNone: { using A = ::cdk_cuda::ActNone; __VA_ARGS__; } break;         \
    case ::cdk_cuda::kActRelu: { using A = ::cdk_cuda::ActRelu; __VA_ARGS__; } break;         \
    case ::cdk_cuda::kActGelu: { using A = ::cdk_cuda::ActGelu; __VA_ARGS__; } break;         \
    case ::cdk_cuda::kActTanh: { using A = ::cdk_cuda::ActTanh; __VA_ARGS__; } break;         \
    case ::cdk_cuda::kActSigmoid: { using A = ::cdk_cuda::ActSigmoid; __VA_ARGS__; } break;   \
    case ::cdk_cuda::kActSoftplus: { using A = ::cdk_cuda::ActSoftplus; __VA_ARGS__; } break; \
    default: throw std::invalid_argument("cdkernels CUDA: bad activation code " +             \
                                         std::to_string(code));                               \
  }

}  // namespace cdk_cuda
