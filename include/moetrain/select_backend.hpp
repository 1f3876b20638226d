// The compute backend a run uses, from train.backend: `cpu`; `cuda` (an error naming the reason
// when this build or this machine has no usable GPU); `auto` (cuda when a GPU is usable, else cpu
// with one log line saying why).
#pragma once

#include <memory>

#include "moetrain/backend.hpp"
#include "moetrain/config.hpp"

namespace moetrain {

// `log`: whether this process reports the choice (rank 0 of a job).
std::unique_ptr<Backend<float>> select_backend(const Config& cfg, bool log);

}  // namespace moetrain
