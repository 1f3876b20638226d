// The runtime of a process: its compute backend and its communicator, chosen together from
// train.backend and the launcher, so their buffers agree (docs/design.md §2):
//   cpu  (train.backend `cpu`, or `auto` without a usable GPU): CpuBackend with MpiComm under
//        mpirun/srun, else a LocalComm whose copies are the backend's;
//   cuda (`cuda`, or `auto` with a usable GPU): CudaBackend with NcclComm under mpirun/srun (built
//        first: it makes the rank's own GPU current), else a LocalComm whose copies run on the
//        backend's stream.
// `cuda` without a usable GPU is an error naming the reason; `auto` then logs one line saying why.
#pragma once

#include <memory>

#include "moetrain/backend.hpp"
#include "moetrain/communicator.hpp"
#include "moetrain/config.hpp"

namespace moetrain {

struct Runtime {
  // Declared in this order so the backend goes first and the communicator (MPI, NCCL) last.
  std::unique_ptr<Communicator> comm;
  std::unique_ptr<Backend<float>> backend;
  bool leader() const { return comm->rank() == 0; }
};

// quiet: no log line about the choice (for commands whose output is the result, like sample).
Runtime make_runtime(const Config& cfg, bool quiet = false);

}  // namespace moetrain
