// What one training step yields (StepResult) and the records the trainer writes from it: the
// metrics.jsonl line of a step or an evaluation, the progress line of the log, and the ZeRO-1
// shard report.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moetrain/communicator.hpp"
#include "moetrain/config.hpp"
#include "moetrain/optimizer.hpp"

namespace moetrain {

struct StepResult {
  double objective = 0, ce = 0;
  std::vector<double> aux, z, entropy;
  std::vector<std::vector<double>> smax;
  std::vector<std::vector<std::int64_t>> load;
  OptimizerStats opt;
  double data_s = 0, compute_s = 0, comm_s = 0, optimizer_s = 0;
  std::uint64_t comm_bytes = 0;  // sent by this rank during the step (ring-algorithm count)
  // Host time inside the communicator's calls during the step: on the CPU (MPI), the exposed
  // communication, waits for slower peers included.
  double comm_blocked_s = 0;
};

// The facts of a completed step that StepResult does not hold.
struct StepInfo {
  std::int64_t step = 0;    // completed steps, this one included
  std::int64_t tokens = 0;  // tokens seen, this step included
  double lr = 0;
  double step_s = 0;  // wall time of the step
  double tokens_per_s = 0;
  double mfu = 0;
  std::int64_t loss_spikes = 0;  // spikes so far
  bool spike = false;            // whether this step's loss is one
};

// The metrics.jsonl line of a step.
nlohmann::json step_record(const ModelConfig& m, const StepResult& r, const StepInfo& info);

// The metrics.jsonl line of an evaluation (mean validation loss `val_loss`).
nlohmann::json eval_record(std::int64_t step, std::int64_t tokens, double val_loss);

// The log's progress line of a step: "step 3/10 | loss ... | ETA 1m05s".
std::string progress_line(const StepResult& r, const StepInfo& info, std::int64_t total_steps,
                          double eta_s);

// <out_dir>/zero1_rank<R>.json: how ZeRO-1 split the optimizer across ranks (after a step), and
// over which communicator (local, mpi, nccl).
nlohmann::json shard_report(const Communicator& comm, const std::string& optimizer_name,
                            const Optimizer<float>& opt);

}  // namespace moetrain
