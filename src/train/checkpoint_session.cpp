#include "moetrain/checkpoint_session.hpp"

#include <filesystem>
#include <stdexcept>

#include <spdlog/spdlog.h>

#include "moetrain/atomic_file.hpp"
#include "moetrain/checkpoint.hpp"
#include "moetrain/data_loader.hpp"
#include "moetrain/json_file.hpp"
#include "moetrain/metrics.hpp"
#include "moetrain/model.hpp"
#include "moetrain/optimizer.hpp"

namespace fs = std::filesystem;

namespace moetrain {

namespace {

// JSON paths (a.b.c, below `prefix`) whose values differ between two configs: keys present in
// only one of them count as differing.
void diff_paths(const nlohmann::json& a, const nlohmann::json& b, const std::string& prefix,
                std::vector<std::string>& out) {
  if (a.is_object() && b.is_object()) {
    for (const auto& [k, v] : a.items())
      diff_paths(v, b.contains(k) ? b.at(k) : nlohmann::json(), prefix + "." + k, out);
    for (const auto& [k, v] : b.items())
      if (!a.contains(k)) out.push_back(prefix + "." + k);
    return;
  }
  if (a != b) out.push_back(prefix);
}

// The settings a run cannot change on resume that differ between the checkpoint's config `then`
// and the run's `now`; throws naming them.
void check_same_config(const nlohmann::json& then, const nlohmann::json& now,
                       const std::string& state_path) {
  std::vector<std::string> diffs;
  for (const char* root : {"model", "data"}) diff_paths(then.at(root), now.at(root), root, diffs);
  for (const char* key : {"name"})
    diff_paths(then.at("optim").at(key), now.at("optim").at(key), std::string("optim.") + key,
               diffs);
  for (const char* key : {"grad_accum", "seed"})
    diff_paths(then.at("train").at(key), now.at("train").at(key), std::string("train.") + key,
               diffs);
  if (!diffs.empty()) {
    std::string list;
    for (const auto& d : diffs) list += (list.empty() ? "" : ", ") + d;
    throw std::runtime_error(state_path + ": the checkpoint was made with a different config (" +
                             list + " differ); resume with the same settings");
  }
}

}  // namespace

// ---- CheckpointReader -------------------------------------------------------------------------

CheckpointReader::CheckpointReader(const std::string& dir)
    : dir_(dir),
      state_path_((fs::path(dir) / "trainer_state.json").string()),
      state_(read_json_file(state_path_, "trainer state", kMaxTrainerStateBytes)) {}

Config CheckpointReader::config(const std::vector<std::string>& overrides) const {
  if (!state_.is_object() || !state_.contains("config"))
    throw std::runtime_error(state_path_ + ": no \"config\" in the trainer state");
  nlohmann::json j = state_.at("config");
  for (const auto& s : overrides) apply_override(j, s);
  return config_from_json(j, state_path_);
}

void CheckpointReader::load_weights(Model<float>& model) const {
  const std::string weights = (fs::path(dir_) / "model.safetensors").string();
  tensors_to_weights(load_safetensors(weights), model, weights);
}

void CheckpointReader::load_expert_bias(Model<float>& model) const {
  model.load_expert_bias_state(state_.at("expert_bias").get<std::vector<std::vector<double>>>(),
                               state_path_);
}

void CheckpointReader::load_model(Model<float>& model) const {
  load_weights(model);
  try {
    load_expert_bias(model);
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(state_path_ + ": malformed expert_bias (" + e.what() + ")");
  }
}

// ---- CheckpointSession ------------------------------------------------------------------------

CheckpointSession::CheckpointSession(const Config& cfg, Communicator& comm, const Parts& parts)
    : cfg_(cfg), comm_(comm), parts_(parts) {}

std::string CheckpointSession::optimizer_file() const {
  return "optimizer_rank" + std::to_string(comm_.rank()) + ".safetensors";
}

std::string CheckpointSession::resolve(const std::string& resume) const {
  if (resume != "latest") return resume;
  const auto latest = latest_checkpoint(cfg_.train.out_dir);
  if (!latest)
    throw std::runtime_error("--resume: no checkpoint in '" + checkpoints_root(cfg_.train.out_dir) +
                             "'");
  return *latest;
}

TrainingProgress CheckpointSession::resume(const std::string& dir) {
  const CheckpointReader ck(dir);
  const std::string& state_path = ck.state_path();
  const nlohmann::json& st = ck.state();
  if (!st.is_object() || st.value("format", "") != "moetrain-checkpoint")
    throw std::runtime_error(state_path + ": not a moetrain trainer state");
  TrainingProgress p;
  try {
    check_same_config(st.at("config"), config_to_json(cfg_), state_path);
    const int world = st.at("world_size").get<int>();
    if (world != comm_.world())
      throw std::runtime_error(state_path + ": saved by " + std::to_string(world) +
                               " rank(s), resumed on " + std::to_string(comm_.world()) +
                               "; resume on the same number of ranks");
    ck.load_weights(parts_.model);
    const std::string opt_path = (fs::path(dir) / optimizer_file()).string();
    parts_.optimizer.load_state(load_safetensors(opt_path), opt_path);
    parts_.loader.restore(st.at("loader"));
    ck.load_expert_bias(parts_.model);
    parts_.spikes.restore(st.at("spike"));
    p.step = st.at("step").get<std::int64_t>();
    p.tokens_seen = st.at("tokens_seen").get<std::int64_t>();
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(state_path + ": malformed trainer state (" + e.what() + ")");
  }
  if (leader()) spdlog::info("resumed from {} at step {}", dir, p.step);
  return p;
}

void CheckpointSession::save(const TrainingProgress& progress) {
  const std::string& out_dir = cfg_.train.out_dir;
  const std::int64_t step = progress.step;
  if (leader()) begin_checkpoint(out_dir, step);
  comm_.barrier();
  const std::string tmp = checkpoint_path(out_dir, step) + ".tmp";
  save_safetensors((fs::path(tmp) / optimizer_file()).string(), parts_.optimizer.state());
  if (leader()) {
    save_safetensors((fs::path(tmp) / "model.safetensors").string(),
                     weights_to_tensors(parts_.model),
                     {{"format", "pt"}, {"step", std::to_string(step)}});
    nlohmann::json st = {{"format", "moetrain-checkpoint"},
                         {"version", 1},
                         {"step", step},
                         {"tokens_seen", progress.tokens_seen},
                         {"world_size", comm_.world()},
                         {"loader", parts_.loader.state()},
                         {"expert_bias", parts_.model.expert_bias_state()},
                         {"spike", parts_.spikes.state()},
                         {"config", config_to_json(cfg_)}};
    write_text_atomically((fs::path(tmp) / "trainer_state.json").string(), st.dump(2) + "\n");
    if (fs::exists(cfg_.data.tokenizer))
      fs::copy_file(cfg_.data.tokenizer, fs::path(tmp) / "tokenizer.json",
                    fs::copy_options::overwrite_existing);
  }
  comm_.barrier();
  if (leader()) {
    const std::string done = commit_checkpoint(out_dir, step, cfg_.train.keep_checkpoints);
    spdlog::info("checkpoint {}", done);
  }
  comm_.barrier();
}

}  // namespace moetrain
