// moetrain::Trainer driven in-process on configs/ci.json (no binary in between): a run stopped
// with stop_at and resumed by a second Trainer gives, bit for bit, the losses, gradient norms and
// final weights of a straight `moetrain train` run of the same config and seed.
#include <catch2/catch.hpp>

#include <memory>

#include "cli_fixture.hpp"
#include "moetrain/communicator.hpp"
#include "moetrain/config.hpp"
#include "moetrain/optimizer.hpp"
#include "moetrain/trainer.hpp"

using namespace moetrain::test;

namespace {

// The overrides of ci_args(), without the shell quoting, plus those of the run.
std::vector<std::string> ci_overrides(const std::string& out_dir) {
  const std::string d = prepared_corpus();
  return {"data.train_pattern=" + d + "/train_*.bin",
          "data.val_pattern=" + d + "/val_*.bin",
          "data.tokenizer=" + d + "/tokenizer.json",
          "train.out_dir=" + out_dir,
          "optim.warmup_steps=1",
          "train.steps=5",
          "train.checkpoint_interval=0",
          "train.eval_interval=0"};
}

std::vector<nlohmann::json> step_lines(const fs::path& run) {
  std::vector<nlohmann::json> out;
  for (auto& j : read_jsonl(run / "metrics.jsonl"))
    if (j.contains("loss")) out.push_back(j);
  return out;
}

// The runtime's communicator, with its host collectives counted.
class CountingComm final : public moetrain::Communicator {
 public:
  explicit CountingComm(std::unique_ptr<moetrain::Communicator> inner) : inner_(std::move(inner)) {}
  int rank() const override { return inner_->rank(); }
  int world() const override { return inner_->world(); }
  const char* name() const override { return inner_->name(); }
  void all_reduce(void* d, std::size_t n, moetrain::DType t, moetrain::ReduceOp op) override {
    inner_->all_reduce(d, n, t, op);
  }
  void reduce_scatter(const void* s, void* r, std::size_t n, moetrain::DType t,
                      moetrain::ReduceOp op) override {
    inner_->reduce_scatter(s, r, n, t, op);
  }
  void all_gather(const void* s, void* r, std::size_t n, moetrain::DType t) override {
    inner_->all_gather(s, r, n, t);
  }
  void broadcast(void* d, std::size_t bytes, int root) override {
    inner_->broadcast(d, bytes, root);
  }
  void barrier() override { inner_->barrier(); }
  void reduce_host(double* sums, std::size_t n_sums, double* maxes, std::size_t n_maxes) override {
    ++host_collectives;
    inner_->reduce_host(sums, n_sums, maxes, n_maxes);
  }
  int host_collectives = 0;

 private:
  std::unique_ptr<moetrain::Communicator> inner_;
};

}  // namespace

// The step's host scalars — losses, S_max, expert loads, and the optimizer's update-RMS and
// clipped-head sums — travel in one host collective; the only other one per step is the stop
// verdict (signals, --stop-at, a failed metrics write), which follows the step's log.
TEST_CASE("Trainer: two host collectives per step, the statistics in one", "[train][trainer]") {
  TempDir tmp("trainer_collectives");
  auto overrides = ci_overrides((tmp.path / "run").string());
  overrides.push_back("model.moe.router=sigmoid_bias");  // expert loads feed the bias update
  const moetrain::Config cfg = moetrain::load_config(source_dir() + "/configs/ci.json", overrides);
  moetrain::Runtime rt = moetrain::make_runtime(cfg);
  auto counting = std::make_unique<CountingComm>(std::move(rt.comm));
  CountingComm* comm = counting.get();
  rt.comm = std::move(counting);
  moetrain::Trainer t(cfg, rt, moetrain::TrainOptions{});
  const int before = comm->host_collectives;
  REQUIRE(t.run() == 0);
  CHECK(t.step() == 5);
  CHECK(comm->host_collectives - before == 2 * 5);
}

TEST_CASE("Trainer: stop_at and resume in-process equal a straight binary run",
          "[train][trainer]") {
  TempDir tmp("trainer");
  const fs::path a = tmp.path / "a", b = tmp.path / "b";
  std::string flags;
  for (const auto& s : ci_overrides(a.string())) flags += " --set '" + s + "'";
  const auto straight =
      run_command(binary() + " train --config " + source_dir() + "/configs/ci.json" + flags);
  INFO(straight.output);
  REQUIRE(straight.exit_code == 0);

  const moetrain::Config cfg =
      moetrain::load_config(source_dir() + "/configs/ci.json", ci_overrides(b.string()));
  {
    moetrain::TrainOptions opts;
    opts.stop_at = 2;
    moetrain::Runtime rt = moetrain::make_runtime(cfg);
    moetrain::Trainer t(cfg, rt, opts);
    CHECK(t.step() == 0);
    REQUIRE(t.run() == 0);
    CHECK(t.step() == 2);
  }
  CHECK(fs::exists(b / "checkpoints" / "step_00000002" / "trainer_state.json"));
  {
    moetrain::TrainOptions opts;
    opts.resume = "latest";
    moetrain::Runtime rt = moetrain::make_runtime(cfg);
    moetrain::Trainer t(cfg, rt, opts);
    CHECK(t.step() == 2);
    REQUIRE(t.run() == 0);
    CHECK(t.step() == 5);
    CHECK(t.tokens_seen() == 5 * 4 * 64);
    CHECK(t.optimizer().step_count() == 5);
  }

  const auto la = step_lines(a), lb = step_lines(b);
  REQUIRE(la.size() == 5);
  REQUIRE(lb.size() == 5);
  for (std::size_t i = 0; i < la.size(); ++i) {
    INFO("step " << i + 1);
    CHECK(la[i]["loss"].dump() == lb[i]["loss"].dump());  // exact, as printed with 17 digits
    CHECK(la[i]["grad_norm"].dump() == lb[i]["grad_norm"].dump());
    CHECK(la[i]["tokens"] == lb[i]["tokens"]);
  }
  CHECK(read_file(a / "checkpoints" / "step_00000005" / "model.safetensors") ==
        read_file(b / "checkpoints" / "step_00000005" / "model.safetensors"));
}
