// NcclComm's factory in a build without the CUDA toolkit: there is no GPU backend to pair it with.
#include <stdexcept>

#include "moetrain/nccl_comm.hpp"

namespace moetrain {

std::unique_ptr<Communicator> make_nccl_comm() {
  throw std::runtime_error(
      "this build of moetrain has no NCCL communicator (built without the "
      "CUDA toolkit)");
}

}  // namespace moetrain
