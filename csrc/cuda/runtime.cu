// runtime.cu -- host-side helpers: errors, device guard, cached device attributes and occupancy.
#include <map>
#include <mutex>
#include <tuple>

#include "common.cuh"

namespace cdk_cuda {

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear a non-sticky error so later calls are not blamed for it
    throw std::runtime_error(std::string("cdkernels CUDA: ") + what + ": " +
                             cudaGetErrorString(err));
  }
}

void check_launch(const char* kernel_name) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("cdkernels CUDA: kernel ") + kernel_name +
                             " failed to launch: " + cudaGetErrorString(err));
}

namespace {
std::mutex g_mu;
std::map<int, int> g_sm_count;                                        // device -> SMs
std::map<std::tuple<int, const void*, int, size_t>, int> g_capacity;  // -> resident blocks

int current_device() {
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  return dev;
}
}  // namespace

int sm_count() {
  const int dev = current_device();
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_sm_count.find(dev);
    if (it != g_sm_count.end()) return it->second;
  }
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev),
             "cudaDeviceGetAttribute(MultiProcessorCount)");
  if (sms < 1) sms = 1;
  std::lock_guard<std::mutex> lock(g_mu);
  g_sm_count[dev] = sms;
  return sms;
}

int grid_capacity(const void* kernel, int threads, size_t dyn_smem) {
  const int dev = current_device();
  const auto key = std::make_tuple(dev, kernel, threads, dyn_smem);
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_capacity.find(key);
    if (it != g_capacity.end()) return it->second;
  }
  int per_sm = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, dyn_smem),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  if (per_sm < 1) per_sm = 1;
  const int cap = per_sm * sm_count();
  std::lock_guard<std::mutex> lock(g_mu);
  g_capacity[key] = cap;
  return cap;
}

DeviceGuard::DeviceGuard(int device) : dev_(device) {
  check_cuda(cudaGetDevice(&prev_), "cudaGetDevice");
  if (prev_ != dev_) check_cuda(cudaSetDevice(dev_), "cudaSetDevice");
}

DeviceGuard::~DeviceGuard() {
  if (prev_ >= 0 && prev_ != dev_) (void)cudaSetDevice(prev_);
}

int device_count() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

int device_query_error(std::string* what) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err == cudaSuccess) {
    what->clear();
    return 0;
  }
  (void)cudaGetLastError();
  *what = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  return static_cast<int>(err);
}

int runtime_version() { return CUDART_VERSION; }

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return v;
}

}  // namespace cdk_cuda
