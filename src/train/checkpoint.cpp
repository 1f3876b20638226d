#include "moetrain/checkpoint.hpp"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <stdexcept>

#include "moetrain/atomic_file.hpp"

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

std::string begin_checkpoint(const std::string& out_dir, std::int64_t step) {
  const std::string tmp = checkpoint_path(out_dir, step) + ".tmp";
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  return tmp;
}

std::string commit_checkpoint(const std::string& out_dir, std::int64_t step, int keep) {
  const std::string final_path = checkpoint_path(out_dir, step);
  const std::string tmp = final_path + ".tmp";
  fsync_directory(tmp);
  fs::remove_all(final_path);  // a checkpoint of the same step from an earlier attempt
  fs::rename(tmp, final_path);
  fsync_directory(checkpoints_root(out_dir));
  auto all = list_checkpoints(out_dir);
  for (std::size_t i = 0; i + std::size_t(keep) < all.size(); ++i) fs::remove_all(all[i]);
  return final_path;
}

#define MOETRAIN_INSTANTIATE(T)                        \
  template TensorMap weights_to_tensors<T>(Model<T>&); \
  template void tensors_to_weights<T>(const TensorMap&, Model<T>&, const std::string&);
MOETRAIN_INSTANTIATE(float)
MOETRAIN_INSTANTIATE(double)
#undef MOETRAIN_INSTANTIATE

}  // namespace moetrain
