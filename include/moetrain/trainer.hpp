// The training loop (DESIGN §2, §4, §7): micro-batches with gradient accumulation, gradient
// averaging over ranks, the optimizer step with QK-clip, the expert-bias update, metrics,
// evaluation, checkpoints, resume and graceful stop on SIGINT/SIGTERM.
#pragma once

#include <cstdint>
#include <string>

#include "moetrain/config.hpp"
#include "moetrain/runtime.hpp"

namespace moetrain {

struct TrainOptions {
  std::string
      resume;  // "": fresh run; "latest": newest checkpoint of train.out_dir; else a checkpoint dir
  std::int64_t stop_at = -1;  // stop (with a checkpoint) after this many completed steps
};

// Runs training; returns the process exit code (0 on completion or graceful stop). Errors that
// stop the run (non-finite loss, bad data, bad checkpoint) are thrown as std::runtime_error after
// everything already written has been left intact.
int run_training(const Config& cfg, Runtime& rt, const TrainOptions& opts);

// Installs SIGINT/SIGTERM handlers that ask the running training loop to checkpoint and stop.
void install_stop_signal_handlers();

}  // namespace moetrain
