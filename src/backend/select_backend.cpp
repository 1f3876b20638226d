#include "moetrain/select_backend.hpp"

#include <spdlog/spdlog.h>

#include <string>

#include "moetrain/cpu_backend.hpp"
#include "moetrain/cuda_backend.hpp"

namespace moetrain {

bool selects_cuda(const Config& cfg) {
  return cfg.train.backend != "cpu" && probe_cuda_devices().count > 0;
}

std::unique_ptr<Backend<float>> select_backend(const Config& cfg, bool log) {
  const std::string& wanted = cfg.train.backend;
  if (wanted == "cpu") return std::make_unique<CpuBackend<float>>();
  const CudaDevices gpus = probe_cuda_devices();
  if (gpus.count == 0) {
    if (wanted == "cuda")
      throw ConfigError("train.backend: 'cuda' was requested, but no usable GPU was found (" +
                        gpus.error + "); use \"auto\" or \"cpu\"");
    if (log) spdlog::info("backend: auto -> cpu (no usable GPU: {})", gpus.error);
    return std::make_unique<CpuBackend<float>>();
  }
  CudaBackendOptions options;
  // The device is the current one: NcclComm, built first in a multi-rank job, made the rank's
  // own GPU current; a single process uses device 0.
  options.device = -1;
  options.bf16 = cfg.train.precision == "bf16";
  options.seed = cfg.train.seed;
  if (log)
    spdlog::info("backend: {} -> cuda ({} GPU(s), device 0: {}; {} GEMMs)", wanted, gpus.count,
                 gpus.name, cfg.train.precision);
  return make_cuda_backend(options);
}

}  // namespace moetrain
