// Checkpoints (docs/design.md §7): one directory per step under
// <out_dir>/checkpoints/step_NNNNNNNN, written under a temporary name, fsynced, then renamed, so a
// directory with the final name is always complete. It holds model.safetensors (weights,
// PyTorch-style names), optimizer_rank<R>.safetensors (each rank's optimizer state),
// trainer_state.json (step, tokens seen, loader state, expert biases, loss-spike state, config) and
// a copy of the tokenizer.
#pragma once

#include <cstddef>
#include <cstdint>
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

// Creates (empty) the temporary directory of the checkpoint of `step` and returns its path.
std::string begin_checkpoint(const std::string& out_dir, std::int64_t step);
// Renames the temporary directory to its final name (durably), then keeps the newest `keep`.
std::string commit_checkpoint(const std::string& out_dir, std::int64_t step, int keep);

// The largest trainer_state.json read (it holds the config, the loader state and the expert
// biases of every layer); read through read_json_file (moetrain/json_file.hpp).
inline constexpr std::size_t kMaxTrainerStateBytes = std::size_t(64) << 20;

}  // namespace moetrain
