// The compute backend a run uses, from train.backend: `cpu`; `cuda` (an error naming the reason
// when this build or this machine has no usable GPU); `auto` (cuda when a GPU is usable, else cpu
// with one log line saying why).
#pragma once

#include <memory>

#include "moetrain/backend.hpp"
#include "moetrain/config.hpp"

namespace moetrain {

// Whether train.backend resolves to cuda here: not `cpu`, and a GPU is usable. (With `cuda` and no
// GPU, select_backend throws.) The communicator follows the same answer: NCCL for GPU buffers.
bool selects_cuda(const Config& cfg);

// `log`: whether this process reports the choice (rank 0 of a job).
std::unique_ptr<Backend<float>> select_backend(const Config& cfg, bool log);

}  // namespace moetrain
