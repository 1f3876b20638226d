#include "moetrain/checkpoint_session.hpp"

#include <climits>
#include <cstdio>
#include <filesystem>
#include <map>
#include <optional>
#include <stdexcept>

#include <spdlog/spdlog.h>

#include "moetrain/atomic_file.hpp"
#include "moetrain/checkpoint.hpp"
#include "moetrain/data_loader.hpp"
#include "moetrain/fault_point.hpp"
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

// The settings a run cannot change on resume: model.*, data.*, optim.name, train.grad_accum,
// train.seed and train.grad_bucket_mib (the ZeRO-1 shard layout of the saved optimizer state) of a
// config's JSON.
nlohmann::json resume_invariants(const nlohmann::json& config) {
  return {{"model", config.at("model")},
          {"data", config.at("data")},
          {"optim", {{"name", config.at("optim").at("name")}}},
          {"train",
           {{"grad_accum", config.at("train").at("grad_accum")},
            {"seed", config.at("train").at("seed")},
            {"grad_bucket_mib", config.at("train").at("grad_bucket_mib")}}}};
}

// The resume invariants that differ between the checkpoint's config `then` and the run's `now`;
// throws naming them.
void check_same_config(const nlohmann::json& then, const nlohmann::json& now,
                       const std::string& state_path) {
  std::vector<std::string> diffs;
  const nlohmann::json a = resume_invariants(then), b = resume_invariants(now);
  for (const auto& [root, v] : a.items()) diff_paths(v, b.at(root), root, diffs);
  if (!diffs.empty()) {
    std::string list;
    for (const auto& d : diffs) list += (list.empty() ? "" : ", ") + d;
    throw std::runtime_error(state_path + ": the checkpoint was made with a different config (" +
                             list + " differ); resume with the same settings");
  }
}

// FNV-1a of the config's resume invariants: written into every piece of a checkpoint, so pieces
// of runs that cannot continue one another are told apart.
std::string config_hash(const nlohmann::json& config) {
  std::uint64_t h = 1469598103934665603ull;
  for (unsigned char c : resume_invariants(config).dump()) h = (h ^ c) * 1099511628211ull;
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

// 2: the optimizer state in the bucketed ZeRO-1 layout (docs/design.md §5.2).
constexpr int kTrainerStateVersion = 2;

// An integer field of the trainer state, in [lo, hi].
std::int64_t state_int(const nlohmann::json& st, const char* key, std::int64_t lo, std::int64_t hi,
                       const std::string& state_path, const std::string& hint = "") {
  if (!st.contains(key))
    throw std::runtime_error(state_path + ": no \"" + std::string(key) + "\" in the trainer state");
  const nlohmann::json& v = st.at(key);
  if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<std::uint64_t>() > INT64_MAX) ||
      v.get<std::int64_t>() < lo || v.get<std::int64_t>() > hi)
    throw std::runtime_error(state_path + ": " + key + " is " + v.dump() +
                             ", expected an integer from " + std::to_string(lo) + " to " +
                             std::to_string(hi) + hint);
  return v.get<std::int64_t>();
}

// The metadata of a checkpoint piece (model or optimizer file) agrees with the trainer state.
void check_piece(const std::map<std::string, std::string>& meta, const std::string& path,
                 const std::map<std::string, std::string>& expected) {
  for (const auto& [key, want] : expected) {
    const auto it = meta.find(key);
    if (it == meta.end()) continue;  // written by a moetrain that did not record it
    if (it->second != want)
      throw std::runtime_error(path + ": its " + key + " is " + it->second +
                               " but trainer_state.json says " + want +
                               ": the pieces of this checkpoint come from different runs or steps");
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
  if (resume != "latest") {
    if (const auto why = incomplete_reason(resume))
      throw std::runtime_error("--resume-from '" + resume + "': not a complete checkpoint (" +
                               *why + ")");
    return resume;
  }
  const auto all = list_checkpoints(cfg_.train.out_dir);
  for (auto it = all.rbegin(); it != all.rend(); ++it) {
    const auto why = incomplete_reason(*it);
    if (!why) return *it;
    if (leader()) spdlog::warn("skipping incomplete checkpoint {} ({})", *it, *why);
  }
  throw std::runtime_error("--resume: no complete checkpoint in '" +
                           checkpoints_root(cfg_.train.out_dir) +
                           "'; start afresh without --resume");
}

TrainingProgress CheckpointSession::resume(const std::string& dir) {
  const CheckpointReader ck(dir);
  const std::string& state_path = ck.state_path();
  const nlohmann::json& st = ck.state();
  if (!st.is_object() || st.value("format", "") != "moetrain-checkpoint")
    throw std::runtime_error(state_path + ": not a moetrain trainer state");
  TrainingProgress p;
  try {
    // Version 1 predates the bucketed ZeRO-1 layout: its optimizer state is in another order.
    state_int(st, "version", kTrainerStateVersion, kTrainerStateVersion, state_path,
              " (a checkpoint of version 1 was written by a moetrain before the bucketed ZeRO-1 "
              "layout of the optimizer state, which cannot be read into this one)");
    check_same_config(st.at("config"), config_to_json(cfg_), state_path);
    const int world = int(state_int(st, "world_size", 1, 1 << 20, state_path));
    if (world != comm_.world())
      throw std::runtime_error(state_path + ": saved by " + std::to_string(world) +
                               " rank(s), resumed on " + std::to_string(comm_.world()) +
                               "; resume on the same number of ranks");
    p.step = state_int(
        st, "step", 0, cfg_.train.steps, state_path,
        " (train.steps is " + std::to_string(cfg_.train.steps) + "; raise it to train further)");
    const std::int64_t per_step = std::int64_t(cfg_.data.batch_size) * cfg_.model.seq_len *
                                  cfg_.train.grad_accum * comm_.world();
    p.tokens_seen = state_int(st, "tokens_seen", p.step * per_step, p.step * per_step, state_path,
                              " (step x tokens per step)");
    const std::string hash = config_hash(st.at("config"));
    std::map<std::string, std::string> expected = {{"step", std::to_string(p.step)},
                                                   {"config_hash", hash}};
    const std::string weights = (fs::path(dir) / "model.safetensors").string();
    std::map<std::string, std::string> meta;
    const TensorMap w = load_safetensors(weights, &meta);
    check_piece(meta, weights, expected);
    tensors_to_weights(w, parts_.model, weights);
    const std::string opt_path = (fs::path(dir) / optimizer_file()).string();
    meta.clear();
    const TensorMap o = load_safetensors(opt_path, &meta);
    expected["rank"] = std::to_string(comm_.rank());
    expected["world_size"] = std::to_string(world);
    check_piece(meta, opt_path, expected);
    parts_.optimizer.load_state(o, opt_path);
    parts_.loader.restore(st.at("loader"));
    try {
      ck.load_expert_bias(parts_.model);
    } catch (const nlohmann::json::exception& e) {
      throw std::runtime_error(state_path + ": malformed expert_bias (" + e.what() + ")");
    }
    parts_.spikes.restore(st.at("spike"));
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(state_path + ": malformed trainer state (" + e.what() + ")");
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    if (what.rfind(dir, 0) == 0 || what.find(state_path) != std::string::npos) throw;
    throw std::runtime_error(state_path + ": " + what);  // loader and spike states
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
  const nlohmann::json config = config_to_json(cfg_);
  const std::string hash = config_hash(config);
  save_safetensors((fs::path(tmp) / optimizer_file()).string(), parts_.optimizer.state(),
                   {{"step", std::to_string(step)},
                    {"rank", std::to_string(comm_.rank())},
                    {"world_size", std::to_string(comm_.world())},
                    {"config_hash", hash}});
  if (leader()) {
    save_safetensors((fs::path(tmp) / "model.safetensors").string(),
                     weights_to_tensors(parts_.model),
                     {{"format", "pt"}, {"step", std::to_string(step)}, {"config_hash", hash}});
    nlohmann::json st = {{"format", "moetrain-checkpoint"},
                         {"version", kTrainerStateVersion},
                         {"step", step},
                         {"tokens_seen", progress.tokens_seen},
                         {"world_size", comm_.world()},
                         {"loader", parts_.loader.state()},
                         {"expert_bias", parts_.model.expert_bias_state()},
                         {"spike", parts_.spikes.state()},
                         {"config", config}};
    if (fs::exists(cfg_.data.tokenizer)) {
      file_fault_point("copy the tokenizer into the checkpoint");
      fs::copy_file(cfg_.data.tokenizer, fs::path(tmp) / "tokenizer.json",
                    fs::copy_options::overwrite_existing);
    }
    write_text_atomically((fs::path(tmp) / "trainer_state.json").string(), st.dump(2) + "\n");
  }
  comm_.barrier();
  if (leader()) {
    const std::string done = commit_checkpoint(out_dir, step);
    spdlog::info("checkpoint {}", done);
  }
  comm_.barrier();
}

void CheckpointSession::prune() {
  if (leader()) prune_checkpoints(cfg_.train.out_dir, cfg_.train.keep_checkpoints);
}

std::optional<std::string> CheckpointSession::newest() const {
  return latest_checkpoint(cfg_.train.out_dir);
}

}  // namespace moetrain
