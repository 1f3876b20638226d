// moetrain::Trainer driven in-process on configs/ci.json (no binary in between): a run stopped
// with stop_at and resumed by a second Trainer gives, bit for bit, the losses, gradient norms and
// final weights of a straight `moetrain train` run of the same config and seed.
#include <catch2/catch.hpp>

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

}  // namespace

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
