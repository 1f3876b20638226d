#include "moetrain/runtime.hpp"

#include <spdlog/spdlog.h>

#include <string>

#include "moetrain/cpu_backend.hpp"
#include "moetrain/cuda_backend.hpp"
#include "moetrain/mpi_comm.hpp"
#include "moetrain/nccl_comm.hpp"

namespace moetrain {

Runtime make_runtime(const Config& cfg, bool quiet) {
  const std::string& wanted = cfg.train.backend;
  const CudaDevices gpus =
      wanted == "cpu" ? CudaDevices{0, "train.backend is cpu", ""} : probe_cuda_devices();
  if (gpus.count == 0 && wanted == "cuda")
    throw ConfigError("train.backend: 'cuda' was requested, but no usable GPU was found (" +
                      gpus.error + "); use \"auto\" or \"cpu\"");
  const bool cuda = gpus.count > 0;
  Runtime rt;
  if (launched_by_mpi()) rt.comm = cuda ? make_nccl_comm() : std::make_unique<MpiComm>();
  const bool log = !quiet && (!rt.comm || rt.comm->rank() == 0);
  if (!cuda) {
    if (log && wanted == "auto")
      spdlog::info("backend: auto -> cpu (no usable GPU: {})", gpus.error);
    CpuBackendOptions options;
    options.bf16 = bf16_gemms(cfg.train, false);
    if (log && options.bf16) spdlog::info("backend: cpu with bf16 GEMM operands (oneDNN)");
    rt.backend = std::make_unique<CpuBackend<float>>(options);
  } else {
    CudaBackendOptions options;
    // The device is the current one: NcclComm, built first in a multi-rank job, made the rank's
    // own GPU current; a single process uses device 0.
    options.device = -1;
    options.bf16 = bf16_gemms(cfg.train, true);
    options.stochastic_weight_rounding = cfg.train.bf16_weight_rounding == "stochastic";
    options.seed = cfg.train.seed;
    options.graphs = cfg.train.cuda_graphs;
    if (log)
      spdlog::info("backend: {} -> cuda ({} GPU(s), device 0: {}; {} GEMMs)", wanted, gpus.count,
                   gpus.name, options.bf16 ? "bf16" : "fp32");
    rt.backend = make_cuda_backend(options);
  }
  if (!rt.comm) rt.comm = make_local_comm(*rt.backend);
  rt.comm->order_with(rt.backend->native_stream());
  return rt;
}

}  // namespace moetrain
