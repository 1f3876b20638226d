// The training loop (DESIGN §2, §4, §7): micro-batches with gradient accumulation, gradient
// averaging over ranks, the optimizer step with QK-clip, the expert-bias update, metrics,
// evaluation, checkpoints, resume and graceful stop on SIGINT/SIGTERM (see signals.hpp).
#pragma once

#include <cstdint>
#include <string>

#include "moetrain/communicator.hpp"
#include "moetrain/config.hpp"

namespace moetrain {

struct TrainOptions {
  std::string
      resume;  // "": fresh run; "latest": newest checkpoint of train.out_dir; else a checkpoint dir
  std::int64_t stop_at = -1;  // stop (with a checkpoint) after this many completed steps
};

// Runs training; returns the process exit code (0 on completion or graceful stop). Errors that
// stop the run (non-finite loss, bad data, bad checkpoint) are thrown as std::runtime_error after
// everything already written has been left intact.
int run_training(const Config& cfg, Communicator& comm, const TrainOptions& opts);

}  // namespace moetrain
