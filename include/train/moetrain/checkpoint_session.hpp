// The full training state of a run in a checkpoint (docs/design.md §7), on top of the directory and
// file helpers of checkpoint.hpp: model.safetensors (weights), optimizer_rank<R>.safetensors (each
// rank's optimizer shard) and trainer_state.json (step, tokens seen, loader state, expert biases,
// loss-spike state, config).
//
// CheckpointReader reads a checkpoint back; the trainer's resume and the eval and sample commands
// share it. CheckpointSession saves a running trainer's state and resumes it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moetrain/communicator.hpp"
#include "moetrain/config.hpp"

namespace moetrain {

template <typename T>
class Model;
template <typename T>
class Optimizer;
class DataLoader;
class SpikeDetector;

// A checkpoint directory opened for reading: its trainer_state.json, parsed once.
class CheckpointReader {
 public:
  // Reads <dir>/trainer_state.json (errors name the file).
  explicit CheckpointReader(const std::string& dir);
  const std::string& dir() const { return dir_; }
  const std::string& state_path() const { return state_path_; }
  const nlohmann::json& state() const { return state_; }

  // The config the checkpoint was trained with (the state's "config"), with "a.b=value"
  // overrides applied, validated.
  Config config(const std::vector<std::string>& overrides) const;
  // model.safetensors into the model's weights: every tensor of its layout, with its shape.
  void load_weights(Model<float>& model) const;
  // The state's expert biases into the model. A malformed "expert_bias" entry throws
  // nlohmann::json::exception, for the caller to word.
  void load_expert_bias(Model<float>& model) const;
  // Both (weights, then expert biases; "malformed expert_bias" errors name the state file).
  void load_model(Model<float>& model) const;

 private:
  std::string dir_, state_path_;
  nlohmann::json state_;
};

// Where a run stands: what trainer_state.json records besides the loader and spike states.
struct TrainingProgress {
  std::int64_t step = 0;  // completed steps
  std::int64_t tokens_seen = 0;
};

// Saves and resumes the training state of one rank of a run whose parts live elsewhere (the
// Trainer). save and resume are collective: every rank calls them.
class CheckpointSession {
 public:
  struct Parts {
    Model<float>& model;
    Optimizer<float>& optimizer;
    DataLoader& loader;
    SpikeDetector& spikes;
  };
  CheckpointSession(const Config& cfg, Communicator& comm, const Parts& parts);

  // The checkpoint directory that --resume names: "latest" is the newest complete checkpoint of
  // train.out_dir (incomplete ones are skipped with a warning; an error when there is none),
  // anything else the directory itself (an error when it is incomplete).
  std::string resolve(const std::string& resume) const;

  // Loads the weights, this rank's optimizer shard, the loader, expert-bias and spike states from
  // checkpoint `dir`, and returns its progress. Refuses a checkpoint made with another config
  // (model.*, data.*, optim.name, train.grad_accum, train.seed) or another number of ranks, a
  // step outside [0, train.steps], tokens_seen other than step x tokens per step, pieces whose
  // step, rank, world size or config hash disagree, and malformed loader or spike states.
  TrainingProgress resume(const std::string& dir);

  // Writes the checkpoint of `progress.step` under train.out_dir (a temporary directory, renamed
  // when complete). Every piece records the step and a hash of the config (the optimizer files
  // also rank and world size), which resume checks against trainer_state.json. Older
  // checkpoints stay until prune().
  void save(const TrainingProgress& progress);
  // Deletes all but the newest train.keep_checkpoints checkpoints.
  void prune();
  // The newest checkpoint directory of train.out_dir, if any.
  std::optional<std::string> newest() const;

 private:
  bool leader() const { return comm_.rank() == 0; }
  std::string optimizer_file() const;

  Config cfg_;
  Communicator& comm_;
  Parts parts_;
};

}  // namespace moetrain
