// Checkpoint I/O (docs/design.md §7): weights to and from named tensors, expert biases, the
// checkpoint directory listing and rotation, and the sigmoid_bias router's bias update
// (docs/design.md §3).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gradcheck.hpp"
#include "moetrain/checkpoint.hpp"
#include "moetrain/cpu_backend.hpp"
#include "moetrain/json_file.hpp"
#include "moetrain/model.hpp"
#include "moetrain/safetensors.hpp"
#include "test_util.hpp"

using namespace moetrain;
using namespace moetrain::test;
namespace fs = std::filesystem;

namespace {

ModelConfig ckpt_config(bool tied = false) {
  ModelConfig c = tiny_model({.heads = 2, .kv_heads = 1, .dense_ff = 6, .shared_ff = 3});
  c.tie_embeddings = tied;
  c.moe.router = RouterType::SigmoidBias;
  return c;
}

template <typename T>
std::vector<T> download_params(Model<T>& m) {
  std::vector<T> h(m.layout().total());
  m.backend().download(h.data(), m.params(), h.size() * sizeof(T));
  return h;
}

template <typename T>
std::vector<double> download_bias(Model<T>& m) {
  std::vector<double> h;
  for (const auto& row : m.expert_bias_state()) h.insert(h.end(), row.begin(), row.end());
  return h;
}

}  // namespace

TEMPLATE_TEST_CASE("weights_to_tensors / tensors_to_weights round trip bit for bit", "[io]", float,
                   double) {
  using T = TestType;
  for (const bool tied : {false, true}) {
    INFO("tied " << tied);
    const ModelConfig cfg = ckpt_config(tied);
    CpuBackend<T> be;
    Model<T> a(cfg, be, 1), b(cfg, be, 1);
    a.init_weights(1);
    b.init_weights(2);
    const std::vector<T> pa = download_params(a);
    REQUIRE(pa != download_params(b));

    const TensorMap t = weights_to_tensors(a);
    // One tensor per layout entry, with its name, shape, dtype and values at its offset.
    REQUIRE(t.size() == a.layout().tensors().size());
    CHECK(t.count("lm_head.weight") == (tied ? 0u : 1u));
    for (const ParamTensor& p : a.layout().tensors()) {
      INFO(p.name);
      REQUIRE(t.count(p.name) == 1);
      const HostTensor& h = t.at(p.name);
      CHECK(h.dtype == (sizeof(T) == 4 ? "F32" : "F64"));
      CHECK(h.shape == p.shape);
      REQUIRE(h.data.size() == p.numel * sizeof(T));
      CHECK(std::memcmp(h.data.data(), pa.data() + p.offset, h.data.size()) == 0);
    }
    // Through a file, as in a checkpoint.
    TempDir dir("ckpt");
    const std::string path = (dir.path / "model.safetensors").string();
    save_safetensors(path, t);
    tensors_to_weights(load_safetensors(path), b, path);
    const std::vector<T> pb = download_params(b);
    CHECK(std::memcmp(pa.data(), pb.data(), pa.size() * sizeof(T)) == 0);
  }
}

TEST_CASE("float weights load into a double model and back exactly", "[io]") {
  const ModelConfig cfg = ckpt_config();
  CpuBackend<float> bf;
  CpuBackend<double> bd;
  Model<float> f(cfg, bf, 1), f2(cfg, bf, 1);
  Model<double> d(cfg, bd, 1);
  f.init_weights(3);
  tensors_to_weights(weights_to_tensors(f), d, "float.safetensors");
  const std::vector<float> pf = download_params(f);
  const std::vector<double> pd = download_params(d);
  for (std::size_t i = 0; i < pf.size(); ++i) REQUIRE(pd[i] == double(pf[i]));
  tensors_to_weights(weights_to_tensors(d), f2, "double.safetensors");
  CHECK(download_params(f2) == pf);
}

TEST_CASE("tensors_to_weights errors name the source and the tensor, and load nothing", "[io]") {
  const ModelConfig cfg = ckpt_config();
  CpuBackend<double> be;
  Model<double> a(cfg, be, 1), b(cfg, be, 1);
  a.init_weights(1);
  b.init_weights(2);
  const std::vector<double> pb = download_params(b);
  const TensorMap good = weights_to_tensors(a);
  const std::string src = "runs/x/checkpoints/ckpt_a/model.safetensors";

  SECTION("missing tensor") {
    TensorMap t = good;
    const std::string name = "layers.2.moe.experts.3.w3.weight";
    REQUIRE(t.erase(name) == 1);
    REQUIRE_THROWS_WITH(tensors_to_weights(t, b, src),
                        Catch::Contains(src) && Catch::Contains(name));
  }
  SECTION("wrong shape, same element count") {
    TensorMap t = good;
    const std::string name = "layers.1.attn.q_proj.weight";  // [8, 8]
    const std::vector<double> v(64, 0.5);
    t[name] = HostTensor::f64({4, 16}, v.data());
    REQUIRE_THROWS_WITH(tensors_to_weights(t, b, src),
                        Catch::Contains(src) && Catch::Contains(name));
  }
  SECTION("wrong shape, another model size") {
    ModelConfig other = cfg;
    other.d_model = 12;
    other.head_dim = 6;
    Model<double> big(other, be, 1);
    big.init_weights(4);
    REQUIRE_THROWS_WITH(tensors_to_weights(weights_to_tensors(big), b, src),
                        Catch::Contains(src) && Catch::Contains("embed.weight"));
  }
  SECTION("integer dtype") {
    // docs/design.md §12: a bad checkpoint gets an error naming the file and the field.
    TensorMap t = good;
    const std::string name = "norm.weight";
    const std::vector<std::int32_t> ones(8, 1);
    t[name] = HostTensor::i32({8}, ones.data());
    REQUIRE_THROWS_WITH(tensors_to_weights(t, b, src),
                        Catch::Contains(src) && Catch::Contains(name));
  }
  // Whatever failed, the model's weights are as they were.
  CHECK(download_params(b) == pb);
}

TEMPLATE_TEST_CASE("expert bias round trip and errors", "[io]", float, double) {
  using T = TestType;
  const ModelConfig cfg = ckpt_config();
  CpuBackend<T> be;
  Model<T> m(cfg, be, 1);
  const std::size_t L = std::size_t(cfg.n_layers), E = std::size_t(cfg.moe.n_experts);
  std::vector<std::vector<double>> bias(L);
  for (std::size_t l = 0; l < L; ++l) bias[l] = random_vector(E, 10 + l, 0.1);
  m.load_expert_bias_state(bias, "state.json");
  bias[0].assign(E, 0.0);  // layer 0 is dense: it has no router, so no bias to load
  // The routers' biases, [n_layers][n_experts] in row-major order.
  const std::vector<double> dev = download_bias(m);
  for (std::size_t l = 0; l < L; ++l)
    for (std::size_t e = 0; e < E; ++e) CHECK(dev[l * E + e] == double(T(bias[l][e])));
  const auto back = m.expert_bias_state();
  REQUIRE(back.size() == L);
  for (std::size_t l = 0; l < L; ++l) {
    REQUIRE(back[l].size() == E);
    for (std::size_t e = 0; e < E; ++e) CHECK(back[l][e] == double(T(bias[l][e])));
  }
  // Writing what was read is the identity.
  m.load_expert_bias_state(back, "state.json");
  CHECK(m.expert_bias_state() == back);

  const std::string src = "ckpt/trainer_state.json";
  auto short_layers = bias;
  short_layers.pop_back();
  REQUIRE_THROWS_WITH(m.load_expert_bias_state(short_layers, src), Catch::Contains(src));
  auto short_row = bias;
  short_row[1].pop_back();
  REQUIRE_THROWS_WITH(m.load_expert_bias_state(short_row, src), Catch::Contains(src));
  auto long_row = bias;
  long_row[2].push_back(1.0);
  REQUIRE_THROWS_WITH(m.load_expert_bias_state(long_row, src), Catch::Contains(src));
  CHECK(m.expert_bias_state() == back);  // the failed writes changed nothing
}

TEST_CASE("list_checkpoints: final step_NNNNNNNN directories only, oldest first", "[io]") {
  TempDir dir("ckpt");
  const std::string out = dir.path.string();
  CHECK(list_checkpoints(out).empty());
  CHECK_FALSE(latest_checkpoint(out).has_value());
  const fs::path root = dir.path / "checkpoints";
  for (const char* d : {"step_00000010", "step_00000002", "step_00000300", "step_00000005.tmp",
                        "step_00000999.tmp", "step_abcdefgh", "step_0000007", "latest", "foo"})
    fs::create_directories(root / d);
  std::ofstream(root / "step_00000008") << "a file, not a directory";
  const std::vector<std::string> expected = {(root / "step_00000002").string(),
                                             (root / "step_00000010").string(),
                                             (root / "step_00000300").string()};
  CHECK(list_checkpoints(out) == expected);
  REQUIRE(latest_checkpoint(out).has_value());
  CHECK(*latest_checkpoint(out) == (root / "step_00000300").string());
  CHECK(checkpoint_path(out, 10) == (root / "step_00000010").string());
}

TEST_CASE("commit_checkpoint publishes the directory and prune_checkpoints keeps the newest `keep`",
          "[io]") {
  TempDir dir("ckpt");
  const std::string out = dir.path.string();
  const int keep = 2;
  for (int step = 1; step <= 5; ++step) {
    INFO("step " << step);
    const std::string tmp = begin_checkpoint(out, step * 10);
    CHECK(fs::is_directory(tmp));
    CHECK(fs::is_empty(tmp));
    // Not complete yet: not listed.
    for (const auto& c : list_checkpoints(out)) CHECK(c != checkpoint_path(out, step * 10));
    std::ofstream(fs::path(tmp) / "trainer_state.json") << "{\"step\": " << step * 10 << "}";
    const std::string final_path = commit_checkpoint(out, step * 10);
    prune_checkpoints(out, keep);
    CHECK(final_path == checkpoint_path(out, step * 10));
    CHECK_FALSE(fs::exists(tmp));
    CHECK(read_json_file((fs::path(final_path) / "trainer_state.json").string(), "trainer state",
                         kMaxTrainerStateBytes)
              .at("step") == step * 10);
    std::vector<std::string> expected;
    for (int s = std::max(1, step - keep + 1); s <= step; ++s)
      expected.push_back(checkpoint_path(out, s * 10));
    CHECK(list_checkpoints(out) == expected);
  }
  // What a killed run left — a half-written step_*.tmp and a half-deleted step_*.deleting — is
  // never listed, and the next checkpoint removes it; other entries are left alone.
  const std::string stale = begin_checkpoint(out, 60);
  std::ofstream(fs::path(stale) / "model.safetensors") << "partial";
  const fs::path half_deleted = fs::path(checkpoint_path(out, 20)).string() + ".deleting";
  fs::create_directories(half_deleted);
  std::ofstream(half_deleted / "trainer_state.json") << "{}";
  const fs::path foreign = fs::path(checkpoints_root(out)) / "notes";
  fs::create_directories(foreign);
  CHECK(list_checkpoints(out) ==
        std::vector<std::string>{checkpoint_path(out, 40), checkpoint_path(out, 50)});
  (void)begin_checkpoint(out, 70);
  CHECK_FALSE(fs::exists(stale));
  CHECK_FALSE(fs::exists(half_deleted));
  CHECK(fs::is_directory(foreign));
  commit_checkpoint(out, 70);
  prune_checkpoints(out, keep);
  CHECK(list_checkpoints(out) ==
        std::vector<std::string>{checkpoint_path(out, 50), checkpoint_path(out, 70)});
}

TEST_CASE("read_json_file errors name the file", "[io]") {
  TempDir dir("ckpt");
  const std::string missing = (dir.path / "nope.json").string();
  REQUIRE_THROWS_WITH(read_json_file(missing, "trainer state", kMaxTrainerStateBytes),
                      Catch::Contains(missing));
  const std::string bad = (dir.path / "bad.json").string();
  std::ofstream(bad) << "{\"step\": ";
  REQUIRE_THROWS_WITH(read_json_file(bad, "trainer state", kMaxTrainerStateBytes),
                      Catch::Contains(bad));
}

TEST_CASE("update_router_biases: b_e += rate * sign(mean_load - load_e) on MoE layers",
          "[io][model]") {
  ModelConfig cfg = ckpt_config();  // layer 0 dense, layers 1 and 2 MoE, 4 experts
  CpuBackend<double> be;
  Model<double> m(cfg, be, 1);
  const std::size_t L = 3, E = 4;
  std::vector<std::vector<double>> b0(L);
  for (std::size_t l = 0; l < L; ++l) b0[l] = random_vector(E, 20 + l, 0.05);
  m.load_expert_bias_state(b0, "test");
  b0[0].assign(E, 0.0);  // layer 0 is dense: it has no router, so no bias to load
  const double rate = 1e-3;
  // Layer 0 is dense: whatever load it is given, its biases stay zero. Layer 1: mean 3, loads
  // above, below and at the mean. Layer 2: perfectly balanced, no change.
  const std::vector<std::vector<std::int64_t>> loads = {{9, 0, 0, 3}, {5, 1, 3, 3}, {2, 2, 2, 2}};
  const double sign1[4] = {-1, +1, 0, 0};
  m.update_router_biases(loads, rate);
  const auto b1 = m.expert_bias_state();
  for (std::size_t e = 0; e < E; ++e) {
    INFO("expert " << e);
    CHECK(b1[0][e] == b0[0][e]);
    CHECK(b1[1][e] == b0[1][e] + rate * sign1[e]);
    CHECK(b1[2][e] == b0[2][e]);
  }
  // A second update accumulates; a mean that is not an integer (7/4) leaves no expert at 0.
  m.update_router_biases({{}, {4, 0, 0, 3}, {1, 2, 3, 4}}, 0.5);
  const auto b2 = m.expert_bias_state();
  const double sign2a[4] = {-1, +1, +1, -1}, sign2b[4] = {+1, +1, -1, -1};  // means 1.75, 2.5
  for (std::size_t e = 0; e < E; ++e) {
    INFO("expert " << e);
    CHECK(b2[0][e] == b0[0][e]);
    CHECK(b2[1][e] == b1[1][e] + 0.5 * sign2a[e]);
    CHECK(b2[2][e] == b1[2][e] + 0.5 * sign2b[e]);
  }
}
