#include "moetrain/checkpoint.hpp"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <stdexcept>

#include "moetrain/atomic_file.hpp"
#include "moetrain/fault_point.hpp"
#include "moetrain/json_file.hpp"

namespace fs = std::filesystem;

namespace moetrain {

std::string checkpoints_root(const std::string& out_dir) {
  return (fs::path(out_dir) / "checkpoints").string();
}

std::string checkpoint_path(const std::string& out_dir, std::int64_t step) {
  char name[32];
  std::snprintf(name, sizeof(name), "step_%08lld", static_cast<long long>(step));
  return (fs::path(checkpoints_root(out_dir)) / name).string();
}

std::vector<std::string> list_checkpoints(const std::string& out_dir) {
  std::vector<std::string> out;
  const fs::path root = checkpoints_root(out_dir);
  if (!fs::is_directory(root)) return out;
  for (const auto& e : fs::directory_iterator(root)) {
    const std::string n = e.path().filename().string();
    if (e.is_directory() && n.size() == 13 && n.rfind("step_", 0) == 0 &&
        std::all_of(n.begin() + 5, n.end(), [](char c) { return c >= '0' && c <= '9'; }))
      out.push_back(e.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::optional<std::string> latest_checkpoint(const std::string& out_dir) {
  auto all = list_checkpoints(out_dir);
  if (all.empty()) return std::nullopt;
  return all.back();
}

template <typename T>
TensorMap weights_to_tensors(Model<T>& model) {
  const ParamLayout& layout = model.layout();
  std::vector<T> host(layout.total());
  model.backend().download(host.data(), model.params(), host.size() * sizeof(T));
  TensorMap out;
  for (const ParamTensor& t : layout.tensors()) {
    if constexpr (sizeof(T) == sizeof(float))
      out[t.name] = HostTensor::f32(t.shape, host.data() + t.offset);
    else
      out[t.name] = HostTensor::f64(t.shape, host.data() + t.offset);
  }
  return out;
}

template <typename T>
void tensors_to_weights(const TensorMap& tensors, Model<T>& model, const std::string& source) {
  const ParamLayout& layout = model.layout();
  std::vector<T> host(layout.total());
  for (const ParamTensor& t : layout.tensors()) {
    const auto it = tensors.find(t.name);
    if (it == tensors.end())
      throw std::runtime_error(source + ": missing tensor '" + t.name +
                               "' (checkpoint of another model configuration?)");
    if (it->second.shape != t.shape)
      throw std::runtime_error(source + ": tensor '" + t.name + "' has shape " +
                               nlohmann::json(it->second.shape).dump() + ", the model expects " +
                               nlohmann::json(t.shape).dump());
    if (it->second.dtype != "F32" && it->second.dtype != "F64")
      throw std::runtime_error(source + ": tensor '" + t.name + "' has dtype " + it->second.dtype +
                               ", expected F32 or F64");
    const std::vector<double> v = it->second.to_f64();
    std::copy(v.begin(), v.end(), host.begin() + std::ptrdiff_t(t.offset));
  }
  model.backend().upload(model.params(), host.data(), host.size() * sizeof(T));
}

namespace {

// Renames `dir` out of the final-name namespace first (one atomic step), then unlinks its files:
// a kill at any point leaves either the complete directory or no directory with a final name.
void remove_checkpoint_dir(const fs::path& dir) {
  const fs::path doomed = dir.string() + ".deleting";
  fs::remove_all(doomed);
  file_fault_point(("rename " + dir.string() + " to " + doomed.string()).c_str());
  fs::rename(dir, doomed);
  fsync_directory(dir.parent_path().string());
  remove_leftover(doomed);
}

bool is_leftover(const std::string& name) {
  auto ends_with = [&](const char* suffix) {
    const std::string s = suffix;
    return name.size() > s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
  };
  return name.rfind("step_", 0) == 0 && (ends_with(".tmp") || ends_with(".deleting"));
}

}  // namespace

void remove_leftover(const fs::path& dir) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    file_fault_point(("unlink " + e.path().string()).c_str());
    fs::remove_all(e.path());
  }
  fs::remove_all(dir);
}

void remove_checkpoint_leftovers(const std::string& out_dir) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(checkpoints_root(out_dir), ec))
    if (e.is_directory() && is_leftover(e.path().filename().string())) remove_leftover(e.path());
}

std::string begin_checkpoint(const std::string& out_dir, std::int64_t step) {
  remove_checkpoint_leftovers(out_dir);
  const std::string tmp = checkpoint_path(out_dir, step) + ".tmp";
  fs::create_directories(tmp);
  return tmp;
}

std::string commit_checkpoint(const std::string& out_dir, std::int64_t step) {
  const std::string final_path = checkpoint_path(out_dir, step);
  const std::string tmp = final_path + ".tmp";
  fsync_directory(tmp);
  // A checkpoint of the same step from an earlier attempt.
  if (fs::exists(final_path)) remove_checkpoint_dir(final_path);
  file_fault_point(("rename " + tmp + " to " + final_path).c_str());
  fs::rename(tmp, final_path);
  fsync_directory(checkpoints_root(out_dir));
  return final_path;
}

void prune_checkpoints(const std::string& out_dir, int keep) {
  const auto all = list_checkpoints(out_dir);
  for (std::size_t i = 0; i + std::size_t(keep) < all.size(); ++i) remove_checkpoint_dir(all[i]);
}

std::string set_checkpoint_aside(const std::string& dir, const std::string& suffix) {
  const std::string aside = dir + "." + suffix;
  fs::remove_all(aside);
  fs::rename(dir, aside);
  fsync_directory(fs::path(dir).parent_path().string());
  return aside;
}

std::optional<std::string> incomplete_reason(const std::string& dir) {
  const fs::path d = dir;
  const fs::path state = d / "trainer_state.json";
  if (!fs::is_regular_file(state)) return "no trainer_state.json";
  nlohmann::json st;
  try {
    st = read_json_file(state.string(), "trainer state", kMaxTrainerStateBytes);
  } catch (const std::exception& e) {
    return std::string("unreadable trainer_state.json (") + e.what() + ")";
  }
  if (!st.is_object() || !st.contains("world_size") || !st["world_size"].is_number_unsigned() ||
      st["world_size"].get<std::uint64_t>() < 1 || st["world_size"].get<std::uint64_t>() > 1u << 20)
    return "trainer_state.json has no valid world_size";
  std::vector<std::string> files = {"model.safetensors"};
  for (std::uint64_t r = 0; r < st["world_size"].get<std::uint64_t>(); ++r)
    files.push_back("optimizer_rank" + std::to_string(r) + ".safetensors");
  for (const auto& f : files)
    if (!fs::is_regular_file(d / f)) return "no " + f;
  return std::nullopt;
}

#define MOETRAIN_INSTANTIATE(T)                        \
  template TensorMap weights_to_tensors<T>(Model<T>&); \
  template void tensors_to_weights<T>(const TensorMap&, Model<T>&, const std::string&);
MOETRAIN_INSTANTIATE(float)
MOETRAIN_INSTANTIATE(double)
#undef MOETRAIN_INSTANTIATE

}  // namespace moetrain
