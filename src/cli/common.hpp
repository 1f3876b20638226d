// Helpers shared by the subcommands: configs and models from checkpoints (see CheckpointReader).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "moetrain/config.hpp"
#include "moetrain/cpu_backend.hpp"
#include "moetrain/model.hpp"

namespace moetrain::cli {

// The config a checkpoint was trained with (from its trainer_state.json), with overrides.
Config checkpoint_config(const std::string& checkpoint_dir, const std::vector<std::string>& sets);

// Flag validators for what CLI11's own let through: a finite number >= 0 (NonNegativeNumber
// accepts nan, since nan < 0 is false), and a decimal integer in [0, 2^64 - 1] (CLI11's strtoull
// saturates a larger one at 2^64 - 1 and wraps a negative one around).
const CLI::Validator& finite_non_negative();
const CLI::Validator& decimal_uint64();

// A model of `batch` sequences with the checkpoint's weights and expert biases.
std::unique_ptr<Model<float>> load_checkpoint_model(const std::string& checkpoint_dir,
                                                    const Config& cfg, Backend<float>& backend,
                                                    int batch);

}  // namespace moetrain::cli
