#include "cli/common.hpp"

#include <filesystem>
#include <stdexcept>

#include "moetrain/checkpoint.hpp"

namespace fs = std::filesystem;

namespace moetrain::cli {

Config load_config_with_overrides(const std::string& path, const std::vector<std::string>& sets) {
  return load_config(path, sets);
}

Config checkpoint_config(const std::string& dir, const std::vector<std::string>& sets) {
  if (!fs::is_directory(dir))
    throw std::runtime_error("--checkpoint '" + dir + "': not a directory");
  const std::string state = (fs::path(dir) / "trainer_state.json").string();
  const nlohmann::json st = read_json_file(state);
  if (!st.is_object() || !st.contains("config"))
    throw std::runtime_error(state + ": no \"config\" in the trainer state");
  nlohmann::json j = st.at("config");
  for (const auto& s : sets) apply_override(j, s);
  return config_from_json(j, state);
}

std::unique_ptr<Model<float>> load_checkpoint_model(const std::string& dir, const Config& cfg,
                                                    Backend<float>& backend, int batch) {
  auto model = std::make_unique<Model<float>>(cfg.model, backend, batch);
  const std::string weights = (fs::path(dir) / "model.safetensors").string();
  tensors_to_weights(load_safetensors(weights), *model, weights);
  const std::string state = (fs::path(dir) / "trainer_state.json").string();
  const nlohmann::json st = read_json_file(state);
  try {
    write_expert_bias(*model, st.at("expert_bias").get<std::vector<std::vector<double>>>(), state);
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(state + ": malformed expert_bias (" + e.what() + ")");
  }
  return model;
}

}  // namespace moetrain::cli
