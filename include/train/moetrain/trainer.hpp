// The training loop (docs/design.md §2, §4, §7): micro-batches with gradient accumulation, gradient
// averaging over ranks, the optimizer step with QK-clip, the expert-bias update, metrics,
// evaluation, checkpoints, resume and graceful stop on SIGINT/SIGTERM (see signals.hpp).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "moetrain/communicator.hpp"
#include "moetrain/config.hpp"
#include "moetrain/flops.hpp"
#include "moetrain/metrics.hpp"
#include "moetrain/runtime.hpp"

namespace moetrain {

template <typename T>
class Backend;
template <typename T>
class Model;
template <typename T>
class DeviceStats;
template <typename T>
class Optimizer;
class DataLoader;
class EvalLoader;
class CheckpointSession;
class Watchdog;
class RunLock;
struct StepResult;

struct TrainOptions {
  // "": a fresh run; "latest": the newest checkpoint of train.out_dir; else a checkpoint directory.
  std::string resume;
  std::int64_t stop_at = -1;  // stop (with a checkpoint) after this many completed steps
};

// One rank's share of a training run, on the runtime's backend and communicator (make_runtime).
// The constructor builds the model, optimizer and data loaders, resumes from a checkpoint when
// asked, and writes the run's config.json; run() trains to train.steps (or until stopped).
class Trainer {
 public:
  // Refuses a fresh run into a train.out_dir that already holds one; nothing is written before
  // everything is loaded.
  Trainer(const Config& cfg, Runtime& rt, const TrainOptions& opts);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  // Trains; returns the process exit code (0 on completion or graceful stop). Errors that stop
  // the run (non-finite loss, bad data, bad checkpoint) are thrown as std::runtime_error after
  // everything already written has been left intact.
  int run();

  const Config& config() const { return cfg_; }
  std::int64_t step() const { return step_; }  // completed steps
  std::int64_t tokens_seen() const { return tokens_seen_; }
  Model<float>& model() { return *model_; }
  Optimizer<float>& optimizer() { return *opt_; }

 private:
  using Clock = std::chrono::steady_clock;
  StepResult train_step(double lr);
  double evaluate();
  void save_checkpoint();
  void log_step(const StepResult& r, double lr, double step_s, bool spike);
  void write_shard_report();
  // Writes a metrics record on the leader; false (the error kept) once a write has failed.
  bool log_safely(const nlohmann::json& record);
  // What a divergence means for the checkpoints, for the error message: the newest one, if no
  // step has run from it yet, is set aside as <dir>.diverged.
  std::string after_divergence();
  bool leader() const { return comm_.rank() == 0; }
  std::int64_t global_tokens_per_step() const;

  Config cfg_;
  Communicator& comm_;
  TrainOptions opts_;
  Backend<float>& be_;
  std::unique_ptr<DeviceStats<float>> stats_;  // the model's and the optimizer's, one block
  std::unique_ptr<Model<float>> model_;
  std::unique_ptr<Optimizer<float>> opt_;
  std::unique_ptr<DataLoader> train_;
  std::unique_ptr<EvalLoader> val_;
  std::unique_ptr<MetricsLog> metrics_;
  SpikeDetector spikes_;
  std::unique_ptr<CheckpointSession> checkpoints_;
  std::int64_t step_ = 0, tokens_seen_ = 0;
  double peak_gflops_ = 0;
  FlopCount flops_;
  std::string out_dir_;
  Clock::time_point started_;
  std::unique_ptr<Watchdog> watchdog_;
  std::int64_t first_step_ = 0;
  std::unique_ptr<RunLock> lock_;  // the leader's lock on out_dir, held for the run
  // Whether the newest checkpoint awaits a step that shows its weights give a finite loss and
  // gradients; older checkpoints are deleted only then (true at start: a resume's first step).
  bool unproven_ = true;
  std::string metrics_failure_;  // the leader's failed metrics write, if any
};

// Trainer(cfg, rt, opts).run().
int run_training(const Config& cfg, Runtime& rt, const TrainOptions& opts);

}  // namespace moetrain
