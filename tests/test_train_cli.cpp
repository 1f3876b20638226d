// End-to-end tests of `moetrain train / eval / sample` through the built binary: metrics and
// checkpoints, bit-for-bit resume, graceful stop on SIGINT, non-finite losses, and the errors for
// checkpoints and configs that cannot be resumed.
#include <catch2/catch.hpp>

#include <signal.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <thread>

#include "cli_fixture.hpp"
#include "moetrain/cuda_backend.hpp"

using namespace moetrain::test;

namespace {

std::string train_cmd(const std::string& out_dir, const std::string& extra) {
  // A one-step warm-up lets tests shorten runs freely (optim.warmup_steps <= train.steps).
  return binary() + " train" + ci_args(out_dir) + " --set optim.warmup_steps=1 " + extra;
}

std::vector<nlohmann::json> step_lines(const fs::path& run) {
  std::vector<nlohmann::json> out;
  for (auto& j : read_jsonl(run / "metrics.jsonl"))
    if (j.contains("loss")) out.push_back(j);
  return out;
}

std::vector<std::string> checkpoint_names(const fs::path& run) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(run / "checkpoints"))
    names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

TEST_CASE("train: metrics, evaluations and checkpoints of a short run", "[train][cli]") {
  TempDir tmp("train_basic");
  const fs::path run = tmp.path / "run";
  const auto r = train_cmd(run.string(),
                           "--set train.steps=6 --set train.checkpoint_interval=2 "
                           "--set train.keep_checkpoints=2 --set train.eval_interval=3 "
                           "--set train.eval_batches=2");
  const auto res = run_command(r);
  INFO(res.output);
  REQUIRE(res.exit_code == 0);
  CHECK(res.output.find("step 6/6") != std::string::npos);

  const auto steps = step_lines(run);
  REQUIRE(steps.size() == 6);
  for (const char* key :
       {"loss", "ce", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "update_rms",
        "smax_max", "clipped_heads", "imbalance", "router_entropy", "loss_spikes", "optimizer_ms"})
    CHECK(steps[0].contains(key));
  CHECK(steps[0]["smax_max"].size() == 2);    // one per layer
  CHECK(steps[0]["imbalance"][0].is_null());  // layer 0 is dense
  CHECK(steps[0]["imbalance"][1].get<double>() >= 1.0);
  // S_max per layer and query head (2 x 4), whose maxima are smax_max; the tokens routed to each
  // of the 4 experts of the MoE layer: every token of the step (4 x 64) goes to top_k = 2 of them.
  for (const auto& st : steps) {
    REQUIRE(st["smax"].size() == 2);
    for (std::size_t l = 0; l < 2; ++l) {
      REQUIRE(st["smax"][l].size() == 4);
      double mx = -1e300;
      for (const auto& v : st["smax"][l]) mx = std::max(mx, v.get<double>());
      CHECK(mx == st["smax_max"][l].get<double>());
    }
    CHECK(st["expert_tokens"][0].is_null());
    REQUIRE(st["expert_tokens"][1].size() == 4);
    long routed = 0;
    for (const auto& c : st["expert_tokens"][1]) routed += c.get<long>();
    CHECK(routed == 4 * 64 * 2);
  }
  CHECK(steps[5]["tokens"].get<long>() == 6 * 4 * 64);
  CHECK(steps[5]["loss"].get<double>() < steps[0]["loss"].get<double>());

  int evals = 0;
  for (auto& j : read_jsonl(run / "metrics.jsonl"))
    if (j.contains("val_loss")) {
      ++evals;
      CHECK(std::isfinite(j["val_loss"].get<double>()));
    }
  CHECK(evals == 2);
  // Checkpoints every 2 steps, the newest 2 kept.
  CHECK(checkpoint_names(run) == std::vector<std::string>{"step_00000004", "step_00000006"});
  for (const char* f :
       {"model.safetensors", "optimizer_rank0.safetensors", "trainer_state.json", "tokenizer.json"})
    CHECK(fs::exists(run / "checkpoints" / "step_00000006" / f));
  CHECK(fs::exists(run / "config.json"));

  // eval and sample on the last checkpoint.
  const std::string ck = (run / "checkpoints" / "step_00000006").string();
  const auto ev = run_command(binary() + " eval --checkpoint " + ck);
  INFO(ev.output);
  CHECK(ev.exit_code == 0);
  CHECK(ev.output.find("val loss") != std::string::npos);
  const auto sm = run_command(binary() + " sample --checkpoint " + ck +
                              " --prompt 'The model' --max-tokens 12");
  INFO(sm.output);
  CHECK(sm.exit_code == 0);
  CHECK(sm.output.rfind("The model", 0) == 0);

  // A fresh run into a directory that already holds one is refused; nothing is touched.
  const std::string before = read_file(run / "metrics.jsonl");
  const auto again = run_command(train_cmd(run.string(), "--set train.steps=6"));
  CHECK(again.exit_code != 0);
  CHECK(again.output.find("already holds a run") != std::string::npos);
  CHECK(read_file(run / "metrics.jsonl") == before);
}

// MFU = training FLOPs per token x tokens/s / peak: against the GEMM the run measures at start-up
// (train.peak_gflops 0), or the peak the config gives. mfu x peak / tokens_per_s is then the
// model's GFLOP per token in every step of both runs.
TEST_CASE("train: MFU is against the measured GEMM peak unless train.peak_gflops gives one",
          "[train][cli]") {
  TempDir tmp("train_peak");
  const auto measured = run_command(
      train_cmd((tmp.path / "m").string(), "--set train.steps=2 --set train.peak_gflops=0"));
  INFO(measured.output);
  REQUIRE(measured.exit_code == 0);
  const auto at = measured.output.find("gemm peak ");
  REQUIRE(at != std::string::npos);
  const double peak = std::stod(measured.output.substr(at + 10));
  CHECK(peak > 0);
  CHECK(measured.output.find("GFLOP/s (measured)", at) != std::string::npos);

  const auto given = run_command(
      train_cmd((tmp.path / "g").string(), "--set train.steps=2 --set train.peak_gflops=37.5"));
  INFO(given.output);
  REQUIRE(given.exit_code == 0);
  CHECK(given.output.find("gemm peak 37.5 GFLOP/s (train.peak_gflops)") != std::string::npos);

  std::vector<double> gflop_per_token;
  for (const auto& [run, p] : {std::pair{"m", peak}, std::pair{"g", 37.5}})
    for (const auto& st : step_lines(tmp.path / run))
      gflop_per_token.push_back(st["mfu"].get<double>() * p / st["tokens_per_s"].get<double>());
  REQUIRE(gflop_per_token.size() == 4);
  for (double g : gflop_per_token) {
    INFO("GFLOP per token " << g << " against " << gflop_per_token[2]);
    // The measured peak is logged to 0.1 GFLOP/s.
    CHECK(g == Approx(gflop_per_token[2]).epsilon(0.1 / peak + 1e-9));
  }
}

TEST_CASE("train: --resume continues bit-for-bit", "[train][cli][resume]") {
  TempDir tmp("train_resume");
  const std::string common =
      "--set train.steps=7 --set train.checkpoint_interval=0 --set train.eval_interval=0";
  const fs::path a = tmp.path / "a", b = tmp.path / "b";
  REQUIRE(run_command(train_cmd(a.string(), common)).exit_code == 0);
  const auto stop = run_command(train_cmd(b.string(), common + " --stop-at 3"));
  INFO(stop.output);
  REQUIRE(stop.exit_code == 0);
  CHECK(checkpoint_names(b) == std::vector<std::string>{"step_00000003"});
  const auto cont = run_command(train_cmd(b.string(), common + " --resume"));
  INFO(cont.output);
  REQUIRE(cont.exit_code == 0);

  const auto la = step_lines(a), lb = step_lines(b);
  REQUIRE(la.size() == 7);
  REQUIRE(lb.size() == 7);
  for (std::size_t i = 0; i < 7; ++i) {
    INFO("step " << i + 1);
    CHECK(la[i]["loss"].dump() == lb[i]["loss"].dump());  // exact, as printed with 17 digits
    CHECK(la[i]["grad_norm"].dump() == lb[i]["grad_norm"].dump());
  }
  CHECK(read_file(a / "checkpoints" / "step_00000007" / "model.safetensors") ==
        read_file(b / "checkpoints" / "step_00000007" / "model.safetensors"));
}

TEST_CASE("train: SIGINT writes a checkpoint and exits 0", "[train][cli][signal]") {
  TempDir tmp("train_sigint");
  const fs::path run = tmp.path / "run";
  const std::string cmd =
      train_cmd(run.string(),
                "--set train.steps=100000 --set train.eval_interval=0 "
                "--set train.checkpoint_interval=0");  // only the SIGINT one: ~60 steps/s here
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::execl("/bin/sh", "sh", "-c",
            ("exec " + cmd + " > " + (tmp.path / "log").string() + " 2>&1").c_str(),
            static_cast<char*>(nullptr));
    ::_exit(127);
  }
  // Wait for the first steps, then interrupt.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline &&
         (!fs::exists(run / "metrics.jsonl") || step_lines(run).size() < 2))
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ::kill(pid, SIGINT);
  int status = 0;
  ::waitpid(pid, &status, 0);
  INFO(read_file(tmp.path / "log"));
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  const auto names = checkpoint_names(run);
  REQUIRE(names.size() == 1);
  const auto st =
      nlohmann::json::parse(read_file(run / "checkpoints" / names[0] / "trainer_state.json"));
  CHECK(st["step"].get<std::size_t>() == step_lines(run).size());
}

TEST_CASE("train: a non-finite loss stops the run and leaves the last checkpoint intact",
          "[train][cli][errors]") {
  TempDir tmp("train_nan");
  const fs::path run = tmp.path / "run";
  REQUIRE(
      run_command(
          train_cmd(
              run.string(),
              "--set train.steps=4 --set optim.warmup_steps=2 --set train.checkpoint_interval=2 "
              "--set train.eval_interval=0"))
          .exit_code == 0);
  const fs::path last = run / "checkpoints" / "step_00000004";
  const std::string weights = read_file(last / "model.safetensors");
  // An absurd learning rate blows the weights up within a step or two.
  const auto res = run_command(train_cmd(run.string(),
                                         "--set train.steps=10 --set optim.lr=1e30 "
                                         "--set optim.grad_clip=0 --set train.eval_interval=0 "
                                         "--set train.checkpoint_interval=0 --resume"));
  INFO(res.output);
  CHECK(res.exit_code != 0);
  CHECK(res.output.find("non-finite") != std::string::npos);
  CHECK(read_file(last / "model.safetensors") == weights);
  CHECK(checkpoint_names(run) == std::vector<std::string>{"step_00000002", "step_00000004"});
  const auto ev = run_command(binary() + " eval --checkpoint " + last.string());
  INFO(ev.output);
  CHECK(ev.exit_code == 0);
}

TEST_CASE("train: unusable checkpoints and configs are refused with clear errors",
          "[train][cli][errors]") {
  TempDir tmp("train_bad_resume");
  const fs::path run = tmp.path / "run";
  REQUIRE(
      run_command(
          train_cmd(run.string(),
                    "--set train.steps=2 --set optim.warmup_steps=1 --set train.eval_interval=0"))
          .exit_code == 0);
  const fs::path ck = run / "checkpoints" / "step_00000002";

  SECTION("a different model config") {
    const auto r =
        run_command(train_cmd(run.string(), "--set train.steps=4 --set model.d_model=32 --resume"));
    INFO(r.output);
    CHECK(r.exit_code != 0);
    CHECK(r.output.find("different config") != std::string::npos);
    CHECK(r.output.find("model.d_model") != std::string::npos);
  }
  SECTION("another gradient bucket size (the optimizer state's shard layout)") {
    const auto r = run_command(
        train_cmd(run.string(), "--set train.steps=4 --set train.grad_bucket_mib=1 --resume"));
    INFO(r.output);
    CHECK(r.exit_code != 0);
    CHECK(r.output.find("different config") != std::string::npos);
    CHECK(r.output.find("train.grad_bucket_mib") != std::string::npos);
  }
  SECTION("a truncated model file") {
    const fs::path copy = tmp.path / "copy";
    fs::copy(ck, copy, fs::copy_options::recursive);
    const auto size = fs::file_size(copy / "model.safetensors");
    fs::resize_file(copy / "model.safetensors", size / 2);
    const auto r =
        run_command(train_cmd(run.string(), "--set train.steps=4 --resume-from " + copy.string()));
    INFO(r.output);
    CHECK(r.exit_code != 0);
    CHECK(r.output.find((copy / "model.safetensors").string()) != std::string::npos);
    CHECK(r.output.find("truncated") != std::string::npos);
  }
  SECTION("a corrupt trainer state") {
    const fs::path copy = tmp.path / "copy2";
    fs::copy(ck, copy, fs::copy_options::recursive);
    std::ofstream(copy / "trainer_state.json")
        << "{\"format\": \"moetrain-checkpoint\", \"step\": ";
    const auto r =
        run_command(train_cmd(run.string(), "--set train.steps=4 --resume-from " + copy.string()));
    INFO(r.output);
    CHECK(r.exit_code != 0);
    CHECK(r.output.find((copy / "trainer_state.json").string()) != std::string::npos);
  }
  SECTION("a trainer state of version 1 (before the bucketed optimizer state)") {
    const fs::path copy = tmp.path / "copy3";
    fs::copy(ck, copy, fs::copy_options::recursive);
    auto st = nlohmann::json::parse(read_file(copy / "trainer_state.json"));
    REQUIRE(st["version"] == 2);
    st["version"] = 1;
    std::ofstream(copy / "trainer_state.json") << st.dump();
    const auto r =
        run_command(train_cmd(run.string(), "--set train.steps=4 --resume-from " + copy.string()));
    INFO(r.output);
    CHECK(r.exit_code != 0);
    CHECK(r.output.find("version is 1") != std::string::npos);
    CHECK(r.output.find("bucketed ZeRO-1 layout") != std::string::npos);
  }
  SECTION("--resume with no checkpoint") {
    const auto r = run_command(train_cmd((tmp.path / "empty").string(), "--resume"));
    INFO(r.output);
    CHECK(r.exit_code != 0);
    CHECK(r.output.find("no complete checkpoint") != std::string::npos);
  }
  SECTION("training data that does not exist") {
    const auto r = run_command(train_cmd((tmp.path / "x").string(),
                                         "--set 'data.train_pattern=/nonexistent/train_*.bin'"));
    INFO(r.output);
    CHECK(r.exit_code != 0);
    CHECK(r.output.find("data.train_pattern") != std::string::npos);
    CHECK(!fs::exists(tmp.path / "x" / "metrics.jsonl"));
  }
  // None of the failed attempts touched the run.
  CHECK(checkpoint_names(run) == std::vector<std::string>{"step_00000002"});
}

TEST_CASE("train: backend auto falls back to the CPU with one log line and cuda needs a GPU",
          "[train][cli]") {
  const moetrain::CudaDevices gpus = moetrain::probe_cuda_devices();
  TempDir tmp("train_backend");
  const std::string one_step = "--set train.steps=1 --set train.eval_interval=0 ";
  if (gpus.count > 0) {  // on a GPU machine, auto picks it
    const auto r = run_command(train_cmd((tmp.path / "gpu").string(), one_step));
    INFO(r.output);
    CHECK(r.exit_code == 0);
    CHECK(r.output.find("backend: auto -> cuda") != std::string::npos);
    return;
  }

  const auto cuda =
      run_command(train_cmd((tmp.path / "cuda").string(), one_step + "--set train.backend=cuda"));
  INFO(cuda.output);
  CHECK(cuda.exit_code != 0);
  CHECK(cuda.output.find("train.backend: 'cuda' was requested, but no usable GPU was found (" +
                         gpus.error + ")") != std::string::npos);
  CHECK_FALSE(fs::exists(tmp.path / "cuda" / "metrics.jsonl"));

  const auto fallback =
      run_command(train_cmd((tmp.path / "auto").string(), one_step + "--set train.backend=auto"));
  INFO(fallback.output);
  REQUIRE(fallback.exit_code == 0);
  const std::string line = "backend: auto -> cpu (no usable GPU: " + gpus.error + ")";
  const auto first = fallback.output.find(line);
  CHECK(first != std::string::npos);
  CHECK(fallback.output.find(line, first + 1) == std::string::npos);  // once

  const auto cpu =
      run_command(train_cmd((tmp.path / "cpu").string(), one_step + "--set train.backend=cpu"));
  INFO(cpu.output);
  REQUIRE(cpu.exit_code == 0);
  CHECK(cpu.output.find("backend: auto") == std::string::npos);
}

// Training with bf16 GEMM operands on the CPU follows the fp32 run of the same config and seed:
// the same data, so the losses differ only by bf16 rounding, which grows slowly as the two runs'
// weights drift apart (measured: at most 2e-4 relative over 20 steps of ci.json); both learn.
TEST_CASE("train: bf16 GEMMs on the CPU follow the fp32 loss curve", "[train][cli]") {
  TempDir tmp("train_bf16");
  std::vector<std::vector<nlohmann::json>> runs;
  for (const char* precision : {"fp32", "bf16"}) {
    const fs::path run = tmp.path / precision;
    const auto res = run_command(
        train_cmd(run.string(),
                  "--set train.backend=cpu --set train.steps=20 --set train.eval_interval=0 "
                  "--set train.precision=" +
                      std::string(precision)));
    INFO(precision << ":\n" << res.output);
    REQUIRE(res.exit_code == 0);
    runs.push_back(step_lines(run));
    REQUIRE(runs.back().size() == 20);
  }
  for (std::size_t i = 0; i < 20; ++i) {
    const double a = runs[0][i]["loss"].get<double>(), b = runs[1][i]["loss"].get<double>();
    INFO("step " << i + 1 << ": fp32 loss " << a << ", bf16 loss " << b);
    CHECK(std::abs(a - b) <= 2e-3 * std::abs(a));
    if (i == 0) CHECK(a != b);  // the bf16 run really rounded
  }
  for (const auto& r : runs) CHECK(r[19]["loss"].get<double>() < r[0]["loss"].get<double>() - 0.2);
}

// train.precision on the CPU: auto and fp32 keep fp32 GEMMs, bf16 gives oneDNN bf16 operands;
// bench names the backend it ran (cpu-fp32 / cpu-bf16) in its JSON.
TEST_CASE("bench: train.precision chooses the CPU's GEMM operands", "[cli][bench]") {
  const std::string cmd = binary() + " bench --config " + source_dir() +
                          "/configs/ci.json --set train.backend=cpu --steps 1 --warmup 0 "
                          "--peak-size 64 --json";
  for (const auto& [precision, backend] :
       {std::pair{"auto", "cpu-fp32"}, std::pair{"fp32", "cpu-fp32"},
        std::pair{"bf16", "cpu-bf16"}}) {
    const CommandResult r = run_command(cmd + " --set train.precision=" + precision);
    INFO(precision << ":\n" << r.output);
    REQUIRE(r.exit_code == 0);
    CHECK(r.output.find(std::string("\"backend\": \"") + backend + "\"") != std::string::npos);
    CHECK((r.output.find("cpu with bf16 GEMM operands") != std::string::npos) ==
          (std::string(precision) == "bf16"));
  }
}

TEST_CASE("bench --profile: the step's phases by time, as text and JSON", "[cli][bench]") {
  const std::string cmd = binary() + " bench --config " + source_dir() +
                          "/configs/ci.json --steps 2 --warmup 1 --peak-size 64 --profile";
  const CommandResult text = run_command(cmd);
  INFO(text.output);
  REQUIRE(text.exit_code == 0);
  CHECK_THAT(text.output, Catch::Contains("phases per step") && Catch::Contains("attention") &&
                              Catch::Contains("experts") && Catch::Contains("other GEMMs") &&
                              Catch::Contains("elementwise") && Catch::Contains("optimizer") &&
                              Catch::Contains("communication"));
  const CommandResult js = run_command(cmd + " --json");
  INFO(js.output);
  REQUIRE(js.exit_code == 0);
  const nlohmann::json r = nlohmann::json::parse(js.output.substr(js.output.find("{\n")));
  const nlohmann::json& ph = r.at("phase_seconds_per_step");
  // Each phase of this MoE model does work; a CPU run has no collective and no device counters.
  for (const char* name : {"attention", "experts", "other GEMMs", "elementwise", "optimizer"}) {
    INFO(name);
    CHECK(ph.at(name).get<double>() > 0);
  }
  CHECK(ph.at("communication").get<double>() == 0);
  CHECK(r.at("phase_clock") == "wall (a sync after each op)");
  CHECK_FALSE(r.contains("host_launches_per_step"));
  // The phases are the ops' times, each measured inside a timed step: together at most the step
  // (grad_accum forward+backwards and one optimizer step).
  double sum = 0;
  for (const auto& [k, v] : ph.items()) sum += v.get<double>();
  CHECK(sum <= 1.01 * (r.at("step_seconds_mean").get<double>() * r.at("grad_accum").get<double>() +
                       r.at("optimizer_seconds").get<double>()));
}

TEST_CASE("bench_vs_torch: moetrain and the PyTorch twin time the same weights and batch",
          "[cli][bench]") {
  TempDir tmp("bench_vs_torch");
  const std::string script = "/usr/bin/python3 " + source_dir() + "/scripts/bench_vs_torch.py " +
                             source_dir() + "/configs/ci.json --binary " + binary();
  const fs::path out = tmp.path / "bench.json";
  const CommandResult r = run_command(script + " --rounds 2 --steps 1 --warmup 0 --threads 1 " +
                                      "--json " + out.string());
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  CHECK(r.output.find("median ratio") != std::string::npos);
  const nlohmann::json j = nlohmann::json::parse(read_file(out));
  REQUIRE(j.at("rounds").size() == 2);
  CHECK(j["rounds"][0]["first"] == "moetrain");  // alternating
  CHECK(j["rounds"][1]["first"] == "torch");
  for (const auto& round : j["rounds"]) {
    // The same model, weights and batch: the twin's float32 loss is moetrain's.
    const double lm = round.at("loss_moetrain").get<double>(), lt = round["loss_torch"];
    CHECK(std::abs(lm - lt) < 1e-4 * std::abs(lm));
    CHECK(round.at("moetrain_tokens_per_s").get<double>() > 0);
    CHECK(round.at("torch_tokens_per_s").get<double>() > 0);
    CHECK(round.at("torch_mfu").get<double>() > 0);
  }
  // The twin's OpenBLAS kernels are named, and are not a generic (no-AVX) fallback on a CPU with
  // AVX2: the script sets OPENBLAS_CORETYPE where OpenBLAS would fall back.
  const std::string core = j.at("torch_openblas_core").get<std::string>();
  INFO("OpenBLAS core " << core);
  CHECK(core != "?");
  std::string flags;
  {
    std::ifstream cpuinfo("/proc/cpuinfo");
    for (std::string line; std::getline(cpuinfo, line);)
      if (line.rfind("flags", 0) == 0) {
        flags = line + " ";
        break;
      }
  }
  if (flags.find(" avx2 ") != std::string::npos && flags.find(" fma ") != std::string::npos &&
      !std::getenv("OPENBLAS_CORETYPE"))
    for (const char* generic : {"Prescott", "Core2", "Penryn", "Dunnington", "Nehalem", "Atom"})
      CHECK(core != generic);
  const CommandResult bad = run_command(script + " --rounds 0");
  CHECK(bad.exit_code == 2);
  CHECK(bad.output.find("--rounds") != std::string::npos);
}

TEST_CASE("bench --dump: an unwritable folder is an error naming it", "[cli][bench]") {
  TempDir tmp("bench_dump");
  const fs::path file = tmp.path / "a_file";
  { std::ofstream(file) << "x"; }
  const CommandResult r = run_command(binary() + " bench --config " + source_dir() +
                                      "/configs/ci.json --steps 1 --warmup 0 --peak-size 64 " +
                                      "--dump " + (file / "sub").string());
  INFO(r.output);
  CHECK(r.exit_code != 0);
  CHECK(r.output.find((file / "sub").string()) != std::string::npos);
}
