// bind_cuda.cpp -- registers the CUDA launchers (csrc/cuda/cuda_api.h) on the extension module.
// Compiled by the host C++ compiler (no nvcc, no torch headers). csrc/bindings.cpp calls
// cdk_register_cuda(m) when built with -DCDK_WITH_CUDA.
//
// Every function takes raw device pointers as Python ints (tensor.data_ptr(); 0 = absent),
// the device index, and the stream as an int (torch.cuda.current_stream(dev).cuda_stream).
// Launches are asynchronous; the GIL is released while launching. Errors raise RuntimeError
// (launch failures) or ValueError (bad codes / sizes).
#include <pybind11/pybind11.h>

#include "cuda_api.h"

namespace py = pybind11;

void cdk_register_cuda(py::module_& m) {
  using namespace cdk_cuda;
  using py::arg;
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("cuda_device_count", &device_count,
        "Number of CUDA devices; 0 when there is no driver or no device (never raises).");
  m.def("cuda_device_error", []() {
        std::string what;
        const int code = device_query_error(&what);
        return py::make_tuple(code, what);
      }, "(cudaError_t code, 'Name: description') of cudaGetDeviceCount; (0, '') on success.");
  m.def("cuda_runtime_version", &runtime_version, "CUDART_VERSION the module was built with.");
  m.def("cuda_driver_version", &driver_version, "CUDA driver version, 0 when there is none.");

  m.def("cuda_philox_words", &philox_words, nogil, arg("device"), arg("stream"), arg("out"),
        arg("n"), arg("seed"), arg("offset"), arg("sample"));
  m.def("cuda_uniform", &uniform, nogil, arg("device"), arg("stream"), arg("out"), arg("n"),
        arg("seed"), arg("offset"), arg("sample"));
  m.def("cuda_normal", &normal, nogil, arg("device"), arg("stream"), arg("dtype"), arg("out"),
        arg("n"), arg("seed"), arg("offset"), arg("sample"));

  m.def("cuda_cd_step_fwd", &cd_step_fwd, nogil, arg("device"), arg("stream"), arg("dtype"),
        arg("n"), arg("x"), arg("f"), arg("y"), arg("dt"), arg("sigma"), arg("sigma_value"),
        arg("C"), arg("chan_stride"), arg("seed"), arg("offset"), arg("act"));
  m.def("cuda_cd_step_bwd", &cd_step_bwd, nogil, arg("device"), arg("stream"), arg("dtype"),
        arg("n"), arg("grad_y"), arg("y"), arg("grad_x"), arg("grad_f"), arg("grad_sigma"),
        arg("dt"), arg("C"), arg("chan_stride"), arg("seed"), arg("offset"), arg("act"));

  m.def("cuda_cd_smooth_fwd", &cd_smooth_fwd, nogil, arg("device"), arg("stream"), arg("dtype"),
        arg("n"), arg("x"), arg("y"), arg("sigma"), arg("sigma_value"), arg("C"),
        arg("chan_stride"), arg("samples"), arg("seed"), arg("offset"), arg("act"));
  m.def("cuda_cd_smooth_bwd", &cd_smooth_bwd, nogil, arg("device"), arg("stream"), arg("dtype"),
        arg("n"), arg("grad_y"), arg("x"), arg("grad_x"), arg("grad_sigma"), arg("sigma"),
        arg("sigma_value"), arg("C"), arg("chan_stride"), arg("samples"), arg("seed"),
        arg("offset"), arg("act"));

  m.def("cuda_ensemble_mean_fwd", &ensemble_mean_fwd, nogil, arg("device"), arg("stream"),
        arg("dtype"), arg("inp"), arg("out"), arg("K"), arg("B"), arg("C"), arg("space"));
  m.def("cuda_ensemble_mean_bwd", &ensemble_mean_bwd, nogil, arg("device"), arg("stream"),
        arg("dtype"), arg("grad_out"), arg("inp"), arg("out"), arg("grad_in"), arg("K"),
        arg("B"), arg("C"), arg("space"));

  m.def("cuda_z_stats_workspace_doubles", &z_stats_workspace_doubles);
  m.def("cuda_z_stats", &z_stats, nogil, arg("device"), arg("stream"), arg("dtype"), arg("n"),
        arg("x"), arg("f"), arg("dt"), arg("workspace"), arg("out"));
  m.def("cuda_z_std_bwd", &z_std_bwd, nogil, arg("device"), arg("stream"), arg("dtype"),
        arg("n"), arg("x"), arg("f"), arg("grad_y"), arg("grad_x"), arg("grad_f"), arg("dt"),
        arg("coefs"));
}
