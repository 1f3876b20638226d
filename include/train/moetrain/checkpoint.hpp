// Checkpoints (docs/design.md §7): one directory per step under
// <out_dir>/checkpoints/step_NNNNNNNN, written under a temporary name, fsynced, then renamed, so a
// directory with the final name is always complete. It holds model.safetensors (weights,
// PyTorch-style names), optimizer_rank<R>.safetensors (each rank's optimizer state),
// trainer_state.json (step, tokens seen, loader state, expert biases, loss-spike state, config) and
// a copy of the tokenizer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moetrain/model.hpp"
#include "moetrain/safetensors.hpp"

namespace moetrain {

std::string checkpoints_root(const std::string& out_dir);
std::string checkpoint_path(const std::string& out_dir, std::int64_t step);
// Complete checkpoints (final names only), oldest first.
std::vector<std::string> list_checkpoints(const std::string& out_dir);
std::optional<std::string> latest_checkpoint(const std::string& out_dir);

// The weights of `model` as named host tensors (F32 for float models, F64 for double).
template <typename T>
TensorMap weights_to_tensors(Model<T>& model);
// Loads weights; every tensor of the layout must be present with its shape. Errors name `source`.
template <typename T>
void tensors_to_weights(const TensorMap& tensors, Model<T>& model, const std::string& source);

// Creates (empty) the temporary directory of the checkpoint of `step` and returns its path. First
// removes what killed runs left: step_*.tmp (half written) and step_*.deleting (half deleted).
std::string begin_checkpoint(const std::string& out_dir, std::int64_t step);
// Renames the temporary directory to its final name (durably) and returns that name.
std::string commit_checkpoint(const std::string& out_dir, std::int64_t step);
// Deletes all but the newest `keep` checkpoints. Each is renamed to <name>.deleting before its
// files are removed, so a kill during the deletion never leaves a final name on a partial
// directory.
void prune_checkpoints(const std::string& out_dir, int keep);
// Moves a checkpoint out of the final names, to <dir>.<suffix>; returns the new path.
std::string set_checkpoint_aside(const std::string& dir, const std::string& suffix);
// Why checkpoint `dir` is not complete (a missing or unreadable piece), or nullopt when it is:
// trainer_state.json, model.safetensors and one optimizer_rank<R>.safetensors per rank.
std::optional<std::string> incomplete_reason(const std::string& dir);
// Removes what killed runs left under <out_dir>/checkpoints: step_*.tmp and step_*.deleting.
void remove_checkpoint_leftovers(const std::string& out_dir);
// Removes a directory file by file (each removal a fault point), then the directory itself.
void remove_leftover(const std::filesystem::path& dir);

// The largest trainer_state.json read (it holds the config, the loader state and the expert
// biases of every layer); read through read_json_file (moetrain/json_file.hpp).
inline constexpr std::size_t kMaxTrainerStateBytes = std::size_t(64) << 20;

}  // namespace moetrain
