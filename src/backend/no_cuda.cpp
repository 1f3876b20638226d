// The CUDA backend's entry points in a build without the CUDA toolkit (MOETRAIN_CUDA=OFF, or no
// nvcc found): there is never a usable GPU, and asking for the backend is an error.
#include <stdexcept>

#include "moetrain/cuda_backend.hpp"

namespace moetrain {

CudaDevices probe_cuda_devices() {
  CudaDevices none;
  none.error = "this build of moetrain has no CUDA backend (built without the CUDA toolkit)";
  return none;
}

std::unique_ptr<Backend<float>> make_cuda_backend(const CudaBackendOptions&) {
  throw std::runtime_error(probe_cuda_devices().error);
}

}  // namespace moetrain
