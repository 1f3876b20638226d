// scripts/compare_optimizers.py end to end on the CI config: a sweep of two optimizers over
// learning-rate grids writes its runs, report and figures; a second invocation redoes only the
// run whose completion record was removed; --compact shrinks the finished runs and reports the same
// table from them; bad arguments are refused naming the flag.
#include <catch2/catch.hpp>

#include <string>

#include "cli_fixture.hpp"

using namespace moetrain::test;

namespace {

std::string harness(const fs::path& out, const std::string& extra) {
  const std::string d = prepared_corpus();
  return "OMP_NUM_THREADS=1 /usr/bin/python3 " + source_dir() +
         "/scripts/compare_optimizers.py --binary " + binary() + " --config " + source_dir() +
         "/configs/ci.json --out " + out.string() + " --set 'data.train_pattern=" + d +
         "/train_*.bin' --set 'data.val_pattern=" + d + "/val_*.bin' --set 'data.tokenizer=" + d +
         "/tokenizer.json' --set train.steps=4 --set train.eval_interval=2 --set "
         "train.eval_batches=1 --set optim.warmup_steps=1 " +
         extra;
}

}  // namespace

TEST_CASE("compare_optimizers: a sweep, its report, and a resumed sweep", "[cli][sweep]") {
  TempDir tmp("sweep");
  const fs::path out = tmp.path / "report";
  const std::string args = "--optimizers adamw,soap --lrs adamw=1e-3,4e-3 soap=2e-3";
  const auto r = run_command(harness(out, args));
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  CHECK(r.output.find("[3/3]") != std::string::npos);
  for (const char* run : {"adamw_lr0.001", "adamw_lr0.004", "soap_lr0.002"}) {
    INFO(run);
    CHECK(fs::exists(out / "runs" / run / "harness.json"));
    CHECK(read_jsonl(out / "runs" / run / "metrics.jsonl").size() >= 4);
  }
  for (const char* f : {"report.md", "lr_sensitivity.png", "val_loss.png", "smax.png"})
    CHECK(fs::file_size(out / f) > 100);
  const std::string md = read_file(out / "report.md");
  CHECK(md.find("| adamw | 0.00") != std::string::npos);
  CHECK(md.find("| soap | 0.002 (grid edge) |") != std::string::npos);

  // Resumed: only the run without its completion record trains again.
  fs::remove(out / "runs/adamw_lr0.004/harness.json");
  const auto again = run_command(harness(out, args));
  INFO(again.output);
  REQUIRE(again.exit_code == 0);
  CHECK(again.output.find("3 runs (2 done before)") != std::string::npos);
  CHECK(again.output.find("[3/3] adamw lr 0.004: ok") != std::string::npos);
  CHECK(again.output.find("soap lr 0.002: ok") == std::string::npos);
  const std::string md_again = read_file(out / "report.md");

  // Compacted (--compact): each finished run keeps config, completion record and gzipped metrics;
  // the sweep counts them as done and reports the same table from them.
  const auto compact = run_command(harness(out, args + " --compact"));
  INFO(compact.output);
  REQUIRE(compact.exit_code == 0);
  CHECK(compact.output.find("3 runs (3 done before)") != std::string::npos);
  for (const char* run : {"adamw_lr0.001", "adamw_lr0.004", "soap_lr0.002"}) {
    INFO(run);
    CHECK(fs::exists(out / "runs" / run / "metrics.jsonl.gz"));
    CHECK_FALSE(fs::exists(out / "runs" / run / "metrics.jsonl"));
    CHECK_FALSE(fs::exists(out / "runs" / run / "checkpoints"));
  }
  CHECK(read_file(out / "report.md") == md_again);
}

TEST_CASE("compare_optimizers: bad arguments are refused naming the flag", "[cli][sweep]") {
  TempDir tmp("sweep_bad");
  const fs::path out = tmp.path / "report";
  for (const auto& [extra, expect] :
       {std::pair{"--optimizers adamw,sgd", "--optimizers"},
        std::pair{"--optimizers adamw --lrs adamw=1e-3,abc", "--lrs: adamw"},
        std::pair{"--optimizers adamw --lrs muon=1e-3", "--lrs: 'muon'"},
        std::pair{"--optimizers adamw --mpirun 0", "--mpirun"},
        std::pair{"--optimizers adamw --set optim.lr=-1", "optim.lr"}}) {
    INFO(extra);
    const auto r = run_command(harness(out, extra));
    INFO(r.output);
    CHECK(r.exit_code == 2);
    CHECK(r.output.find(expect) != std::string::npos);
    CHECK_FALSE(fs::exists(out / "runs"));
  }
}
