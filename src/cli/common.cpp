#include "cli/common.hpp"

#include <filesystem>
#include <stdexcept>

#include "moetrain/checkpoint_session.hpp"

namespace fs = std::filesystem;

namespace moetrain::cli {

Config checkpoint_config(const std::string& dir, const std::vector<std::string>& sets) {
  if (!fs::is_directory(dir))
    throw std::runtime_error("--checkpoint '" + dir + "': not a directory");
  return CheckpointReader(dir).config(sets);
}

std::unique_ptr<Model<float>> load_checkpoint_model(const std::string& dir, const Config& cfg,
                                                    Backend<float>& backend, int batch) {
  auto model = std::make_unique<Model<float>>(cfg.model, backend, batch);
  CheckpointReader(dir).load_model(*model);
  return model;
}

}  // namespace moetrain::cli
