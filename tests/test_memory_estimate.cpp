// The memory estimate (docs/design.md §2.2) against what the model and the optimizer really
// allocate, the 64-bit size checks of the config, and the start-up refusal of runs that cannot fit.
#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <limits>
#include <map>

#include "cli_fixture.hpp"
#include "moetrain/communicator.hpp"
#include "moetrain/cpu_backend.hpp"
#include "moetrain/memory_check.hpp"
#include "moetrain/memory_estimate.hpp"
#include "moetrain/model.hpp"
#include "moetrain/optimizer.hpp"

using namespace moetrain;
using namespace moetrain::test;

namespace {

// CpuBackend that counts the bytes live through alloc_bytes and their peak.
class CountingBackend final : public Backend<float> {
 public:
  const char* name() const override { return inner_.name(); }
  void* alloc_bytes(std::size_t bytes) override {
    void* p = inner_.alloc_bytes(bytes);
    const std::size_t rounded = std::max<std::size_t>((bytes + 63) / 64 * 64, 64);
    live_[p] = rounded;
    current_ += rounded;
    peak_ = std::max(peak_, current_);
    return p;
  }
  void free_bytes(void* p) override {
    if (auto it = live_.find(p); it != live_.end()) {
      current_ -= it->second;
      live_.erase(it);
    }
    inner_.free_bytes(p);
  }
  std::size_t peak() const { return peak_; }

#define MOETRAIN_COUNT_PASS(ret, name, params, args, flops) \
  ret name params override {                                \
    return inner_.name args;                                \
  }
#define MOETRAIN_COUNT_QUERY(ret, name, params, args, flops) \
  ret name params const override {                           \
    return inner_.name args;                                 \
  }
  MOETRAIN_COUNT_PASS(void, upload, (void* dst, const void* src, std::size_t bytes),
                      (dst, src, bytes), 0)
  MOETRAIN_COUNT_PASS(void, download, (void* dst, const void* src, std::size_t bytes),
                      (dst, src, bytes), 0)
  MOETRAIN_COUNT_PASS(void, copy, (void* dst, const void* src, std::size_t bytes),
                      (dst, src, bytes), 0)
  MOETRAIN_COUNT_PASS(void, zero, (void* dst, std::size_t bytes), (dst, bytes), 0)
  MOETRAIN_COUNT_PASS(void, set_weights, (const float* w, std::size_t count), (w, count), 0)
  MOETRAIN_BACKEND_OPS(MOETRAIN_COUNT_PASS, float)
  MOETRAIN_BACKEND_QUERIES(MOETRAIN_COUNT_QUERY, float)
#undef MOETRAIN_COUNT_PASS
#undef MOETRAIN_COUNT_QUERY

 private:
  CpuBackend<float> inner_;
  std::map<void*, std::size_t> live_;
  std::size_t current_ = 0, peak_ = 0;
};

// A world of `world` ranks seen from `rank` that moves nothing: enough to build the ZeRO-1 plan
// and the optimizer's buffers of that rank.
class FakeWorld final : public Communicator {
 public:
  FakeWorld(int rank, int world) : rank_(rank), world_(world) {}
  int rank() const override { return rank_; }
  int world() const override { return world_; }
  const char* name() const override { return "fake"; }
  void all_reduce(void*, std::size_t, DType, ReduceOp) override {}
  void reduce_scatter(const void*, void*, std::size_t, DType, ReduceOp) override {}
  void all_gather(const void*, void*, std::size_t, DType) override {}
  void broadcast(void*, std::size_t, int) override {}
  void barrier() override {}
  void reduce_host(double*, std::size_t, double*, std::size_t) override {}

 private:
  int rank_, world_;
};

Config ci_config(const std::vector<std::string>& overrides) {
  return load_config(source_dir() + "/configs/ci.json", overrides);
}

// The peak of alloc_bytes while a Model and an Optimizer are built and one step runs, on `rank`
// of `world`.
std::size_t measured_peak(const Config& cfg, int rank, int world) {
  CountingBackend be;
  FakeWorld comm(rank, world);
  Model<float> model(cfg.model, be, cfg.data.batch_size);
  model.init_weights(1);
  Optimizer<float> opt(cfg, model.layout(), be, world > 1 ? &comm : nullptr);
  std::vector<std::int32_t> tokens(std::size_t(model.tokens()) + 1);
  for (std::size_t i = 0; i < tokens.size(); ++i)
    tokens[i] = std::int32_t(i * 7 % std::size_t(cfg.model.vocab_size));
  model.forward_backward(tokens.data(), tokens.data() + 1, 1.0);
  if (world == 1) opt.step(model.params(), model.grads(), 1e-3, model.stats().smax);
  return be.peak();
}

}  // namespace

TEST_CASE("memory estimate: within a few percent of what the model and optimizer allocate",
          "[memory]") {
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {"MoE, muonclip (ci.json)", {}},
      {"dense, adamw",
       {"model.dense_layers=2", "optim.name=adamw", "model.d_model=96", "model.n_heads=3",
        "model.n_kv_heads=1"}},
      {"MoE, muon, 3 layers, no shared expert",
       {"model.n_layers=3", "optim.name=muon", "model.moe.n_shared_experts=0",
        "model.moe.router=softmax_topk", "model.moe.n_experts=8", "data.batch_size=2"}},
  };
  for (const auto& [label, overrides] : cases) {
    const Config cfg = ci_config(overrides);
    for (int world : {1, 2}) {
      const CpuBackend<float> cpu;
      const MemoryEstimate e = estimate_memory(cfg, cpu, world);
      std::size_t peak = 0;
      for (int rank = 0; rank < world; ++rank)
        peak = std::max(peak, measured_peak(cfg, rank, world));
      INFO(label << ", world " << world << ": estimate " << e.total() << " B (" << describe(e)
                 << "), measured peak " << peak << " B");
      CHECK(e.param_count == ParamLayout(cfg.model).total());
      CHECK(double(e.total()) >= double(peak) - 4096);
      CHECK(double(e.total()) <= 1.03 * double(peak));
    }
  }
}

TEST_CASE("memory estimate: the optimizer's part shards over ranks", "[memory]") {
  const Config cfg = ci_config({"optim.name=adamw"});
  CHECK(optimizer_memory_bytes(cfg, 4) < optimizer_memory_bytes(cfg, 1));
}

TEST_CASE("memory estimate: sizes that overflow 64 bits are too large, not wrapped", "[memory]") {
  const Config cfg = ci_config({"model.n_layers=2000000000", "model.vocab_size=2147483647",
                                "model.d_model=2147483646", "model.n_heads=1", "model.n_kv_heads=1",
                                "model.head_dim=2", "model.dense_ff=1073741823"});
  const CpuBackend<float> cpu;
  CHECK_THROWS_WITH(estimate_memory(cfg, cpu, 1), Catch::Contains("too large"));
}

TEST_CASE("config: products kept in int are checked in 64 bits and refused naming the fields",
          "[memory][config]") {
  CHECK_THROWS_WITH(
      ci_config({"model.n_heads=65536", "model.n_kv_heads=65536", "model.head_dim=65536"}),
      Catch::Contains("model.n_heads * model.head_dim = 4294967296 exceeds"));
  CHECK_THROWS_WITH(ci_config({"model.seq_len=2147483647"}),
                    Catch::Contains("data.batch_size * model.seq_len"));
  CHECK_THROWS_WITH(ci_config({"data.batch_size=2147483647"}),
                    Catch::Contains("data.batch_size * model.seq_len"));
  CHECK_THROWS_WITH(ci_config({"data.batch_size=1", "model.seq_len=2000000000"}),
                    Catch::Contains("data.batch_size * model.seq_len * model.moe.top_k"));
  CHECK_THROWS_WITH(ci_config({"model.dense_ff=2000000000"}),
                    Catch::Contains("2 * model.dense_ff"));
}

TEST_CASE(
    "train: a run that cannot fit is refused at once with the estimate and the memory "
    "available",
    "[faults][memory][cli]") {
  TempDir tmp("mem_refuse");
  for (const std::string set :
       {"model.d_model=65536", "model.n_layers=1000000000", "model.vocab_size=2147483647"}) {
    const auto t0 = std::chrono::steady_clock::now();
    const CommandResult r =
        run_command(binary() + " train" + ci_args((tmp.path / "run").string()) + " --set " + set);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    INFO(set << ": " << r.output);
    CHECK(r.exit_code == 1);
    CHECK(s < 5);
    CHECK_THAT(r.output, Catch::Contains("does not fit in memory") &&
                             Catch::Contains("memory estimate per rank") &&
                             Catch::Contains("available on cpu-fp32") &&
                             !Catch::Contains("bad_alloc"));
    CHECK(!fs::exists(tmp.path / "run" / "config.json"));
  }
  for (const std::string set : {"model.seq_len=2147483647", "data.batch_size=2147483647"}) {
    const CommandResult r =
        run_command(binary() + " train" + ci_args((tmp.path / "run").string()) + " --set " + set);
    INFO(set << ": " << r.output);
    CHECK(r.exit_code == 1);
    CHECK_THAT(r.output,
               Catch::Contains("data.batch_size * model.seq_len") && !Catch::Contains("bad_alloc"));
  }
}

TEST_CASE("bench: a model that cannot fit is refused before it is allocated",
          "[faults][memory][cli]") {
  const CommandResult r = run_command(binary() + " bench --config " + source_dir() +
                                      "/configs/ci.json --set model.d_model=65536");
  INFO(r.output);
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Catch::Contains("does not fit in memory") && !Catch::Contains("bad_alloc"));
}

TEST_CASE("config --check prints the memory estimate and the host memory available",
          "[memory][cli]") {
  const CommandResult r =
      run_command(binary() + " config --check " + source_dir() + "/configs/ci.json");
  INFO(r.output);
  CHECK(r.exit_code == 0);
  CHECK_THAT(r.output, Catch::Contains("memory estimate (1 rank") &&
                           Catch::Contains("optimizer state") && Catch::Contains("activations") &&
                           Catch::Contains("host memory: ") &&
                           Catch::Contains("available on cpu-fp32"));
}

TEST_CASE("cpu backend: available memory is MemAvailable, at most the machine's memory",
          "[memory]") {
  const CpuBackend<float> cpu;
  const std::size_t avail = cpu.available_memory_bytes();
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  unsigned long long kb = 0;
  std::size_t total = 0;
  while (meminfo >> key >> kb) {
    meminfo.ignore(std::numeric_limits<std::streamsize>::max(), '\n');
    if (key == "MemTotal:") total = std::size_t(kb) * 1024;
  }
  REQUIRE(total > 0);
  CHECK(avail > 0);
  CHECK(avail <= total);
}
