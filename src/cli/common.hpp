// Helpers shared by the subcommands: configs and models from checkpoints (see CheckpointReader).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "moetrain/config.hpp"
#include "moetrain/cpu_backend.hpp"
#include "moetrain/model.hpp"

namespace moetrain::cli {

// The config a checkpoint was trained with (from its trainer_state.json), with overrides.
Config checkpoint_config(const std::string& checkpoint_dir, const std::vector<std::string>& sets);

// A model of `batch` sequences with the checkpoint's weights and expert biases.
std::unique_ptr<Model<float>> load_checkpoint_model(const std::string& checkpoint_dir,
                                                    const Config& cfg, Backend<float>& backend,
                                                    int batch);

}  // namespace moetrain::cli
