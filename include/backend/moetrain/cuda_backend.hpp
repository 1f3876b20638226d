// The CUDA backend, seen from plain C++: device detection and a factory. The class itself
// (src/backend/cuda/) needs the CUDA headers; nothing here does, so the trainer and the CLI include
// this in every build. In a build without the CUDA toolkit, probe_cuda_devices() finds none and
// make_cuda_backend() throws.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "moetrain/backend.hpp"

namespace moetrain {

struct CudaDevices {
  int count = 0;      // usable GPUs (0 when none, or when the driver/runtime refuses)
  std::string error;  // why count is 0, e.g. "cudaGetDeviceCount: cudaErrorNoDevice (...)"
  std::string name;   // device 0's name when count > 0
};
CudaDevices probe_cuda_devices();

struct CudaBackendOptions {
  int device = -1;  // -1: the current device (NcclComm makes each rank's own GPU current)
  // bf16: GEMMs read bf16 operands (activations rounded to nearest, weights from a bf16 copy of the
  // fp32 master weights) and accumulate in fp32.
  // fp32: GEMMs read fp32 operands (for checks against the CPU backend).
  bool bf16 = true;
  // The bf16 weight copy: round to nearest (false), or stochastically from `seed` (true).
  bool stochastic_weight_rounding = false;
  std::uint64_t seed = 0;
  // Backend::run_repeated as CUDA graphs: captured on a key's second call, replayed from its third
  // (false: every call runs its ops eagerly).
  bool graphs = true;
};
std::unique_ptr<Backend<float>> make_cuda_backend(const CudaBackendOptions& options);

}  // namespace moetrain
