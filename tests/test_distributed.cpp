// Data parallelism on the CPU with `mpirun -np 2` (docs/design.md §5): the result contract against
// one rank, ZeRO-1's split of the optimizer (each Muon matrix orthogonalised once, about half the
// state per rank), bit-for-bit resume on 2 ranks, refusal of another world size, and a killed
// rank ending the job.
#include <catch2/catch.hpp>

#include <signal.h>

#include <chrono>
#include <cmath>
#include <set>
#include <sstream>
#include <thread>

#include "cli_fixture.hpp"
#include "moetrain/safetensors.hpp"

using namespace moetrain::test;

namespace {

// OpenMPI refuses root without these; 2 ranks on 2 cores with one OpenMP thread each.
std::string mpirun(int ranks) {
  return "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun -np " +
         std::to_string(ranks) + " --oversubscribe --bind-to none -x OMP_NUM_THREADS=1 ";
}

// The same global batch of 4 sequences, as 1 x 4 or 2 x 2.
std::string train_cmd(int ranks, const std::string& out, const std::string& extra) {
  const std::string batch = ranks == 1 ? "4" : "2";
  const std::string launcher = ranks == 1 ? "OMP_NUM_THREADS=1 " : mpirun(ranks);
  return launcher + binary() + " train" + ci_args(out) + " --set optim.warmup_steps=1" +
         " --set data.batch_size=" + batch + " " + extra;
}

nlohmann::json read_json(const fs::path& p) {
  return nlohmann::json::parse(read_file(p));
}

}  // namespace

TEST_CASE("2 ranks with batch B/2 match 1 rank with batch B after 5 steps of each optimizer",
          "[mpi][distributed]") {
  TempDir tmp("mpi_contract");
  // The Switch aux loss is computed per rank's batch (not additive over ranks), so it is off
  // here; the z-loss is a per-token mean and averages exactly. tau is low enough to clip.
  const std::string common =
      "--set train.steps=5 --set train.eval_interval=0 --set model.moe.aux_loss_coef=0 "
      "--set optim.qk_clip_tau=0.05 --set optim.soap_precondition_frequency=2";
  // adamw_qk_clip: QK-clip on AdamW's q and k, which every rank clips in its own copy.
  // soap_unrotated: SOAP with no side rotated (soap_max_precond_dim 1), held to the common bound.
  // SOAP's first update (at its second step: the first only builds state) is Adam's sign-like
  // m / sqrt(v) on one gradient, so an element whose gradient is within rounding of zero moves by
  // the full lr in either direction: batch B against 2 x B/2 measured 1.5e-5 on one CPU (AdamW's
  // own sign-like first step comes at warm-up's smallest lr). Rotated SOAP amplifies rounding
  // further: at its first step each factor of a non-square matrix (and of a rarely routed expert)
  // is rank-deficient, its eigenbasis in the null space is whatever the solver makes of rounding
  // noise, and the Adam step there has full size (the reference behaves alike); one rank with
  // batch B moves such matrices by 20% against two with B/2. So both SOAP cases run the same
  // micro-batches on one rank as on two (batch B/2, two accumulated), whose gradients differ in
  // the last bits only, rotated SOAP against a bound of 1e-3.
  for (const char* opt : {"adamw", "muon", "muonclip", "adamw_qk_clip", "normuon", "adamuon",
                          "soap", "soap_unrotated"}) {
    INFO(opt);
    const bool adamw_clip = std::string(opt) == "adamw_qk_clip";
    const bool soap_rotated = std::string(opt) == "soap";
    const fs::path one = tmp.path / (std::string(opt) + "_1"),
                   two = tmp.path / (std::string(opt) + "_2");
    std::string extra = common + " --set optim.name=" + std::string(opt);
    if (adamw_clip) extra = common + " --set optim.name=adamw --set optim.qk_clip=true";
    if (std::string(opt) == "soap_unrotated")
      extra = common + " --set optim.name=soap --set optim.soap_max_precond_dim=1";
    const bool soap = soap_rotated || std::string(opt) == "soap_unrotated";
    const std::string same_batches =
        soap ? " --set data.batch_size=2 --set train.grad_accum=2" : "";
    const auto r1 = run_command(train_cmd(1, one.string(), extra + same_batches));
    INFO(r1.output);
    REQUIRE(r1.exit_code == 0);
    const auto r2 = run_command(train_cmd(2, two.string(), extra));
    INFO(r2.output);
    REQUIRE(r2.exit_code == 0);

    const auto a =
        moetrain::load_safetensors((one / "checkpoints/step_00000005/model.safetensors").string());
    const auto b =
        moetrain::load_safetensors((two / "checkpoints/step_00000005/model.safetensors").string());
    REQUIRE(a.size() == b.size());
    double worst = 0;
    std::string worst_name;
    for (const auto& [name, t] : a) {
      const auto x = t.to_f64(), y = b.at(name).to_f64();
      double d = 0, n = 0;
      for (std::size_t i = 0; i < x.size(); ++i) {
        d += (x[i] - y[i]) * (x[i] - y[i]);
        n += x[i] * x[i];
      }
      const double rel = std::sqrt(d) / std::max(std::sqrt(n), 1e-30);
      if (rel > worst) {
        worst = rel;
        worst_name = name;
      }
    }
    INFO("worst tensor " << worst_name << ": " << worst);
    CHECK(worst <= (soap_rotated ? 1e-3 : 1e-5));
    {
      std::vector<double> l1, l2;
      for (auto& j : read_jsonl(one / "metrics.jsonl"))
        if (j.contains("loss")) l1.push_back(j["loss"].get<double>());
      for (auto& j : read_jsonl(two / "metrics.jsonl"))
        if (j.contains("loss")) l2.push_back(j["loss"].get<double>());
      REQUIRE(l1.size() == 5);
      REQUIRE(l2.size() == 5);
      for (std::size_t i = 0; i < 5; ++i) {
        INFO("step " << i + 1 << ": loss " << l1[i] << " on 1 rank, " << l2[i] << " on 2");
        CHECK(std::abs(l1[i] - l2[i]) <= 1e-6 * std::abs(l1[i]));
      }
    }

    // ZeRO-1: every Muon matrix is owned, and orthogonalised, by exactly one rank; each rank
    // holds about half the optimizer state of the single rank.
    const auto z1 = read_json(one / "zero1_rank0.json");
    const auto z20 = read_json(two / "zero1_rank0.json"), z21 = read_json(two / "zero1_rank1.json");
    const auto all = z1["owned_muon_matrices"].get<std::vector<std::string>>();
    auto m0 = z20["owned_muon_matrices"].get<std::vector<std::string>>();
    auto m1 = z21["owned_muon_matrices"].get<std::vector<std::string>>();
    std::set<std::string> joined(m0.begin(), m0.end());
    for (const auto& m : m1) CHECK(joined.insert(m).second);  // disjoint
    CHECK(joined == std::set<std::string>(all.begin(), all.end()));
    CHECK(z20["orthogonalised_last_step"].get<int>() + z21["orthogonalised_last_step"].get<int>() ==
          int(all.size()));
    CHECK(z1["orthogonalised_last_step"].get<int>() == int(all.size()));
    if (std::string(opt).rfind("adamw", 0) != 0) CHECK(!m0.empty());
    // Bytes per step against the ZeRO-1 lower bound (a reduce-scatter of the fp32 gradients and
    // an all-gather of the weights, each (N-1)/N * 4 * P bytes for N = 2): padding to equal
    // shards and the scalar all-reduces (loss, S_max, expert loads) add only a little.
    double params = 0;
    for (const auto& [name, t] : a) params += double(t.to_f64().size());
    const double bound = 2.0 * 0.5 * 4.0 * params;
    // A field of the last metrics record that has it (-1: none).
    auto last = [](const fs::path& run, const char* key) {
      double value = -1;
      std::istringstream lines(read_file(run / "metrics.jsonl"));
      for (std::string line; std::getline(lines, line);) {
        const auto rec = nlohmann::json::parse(line);
        if (rec.contains(key)) value = rec[key].get<double>();
      }
      return value;
    };
    CHECK(last(one, "comm_bytes") == 0);
    // The clipped heads of the last step: counted once in the cluster, as on one rank.
    CHECK(last(two, "clipped_heads") == last(one, "clipped_heads"));
    if (adamw_clip || std::string(opt) == "muonclip") CHECK(last(one, "clipped_heads") > 0);
    if (std::string(opt) == "adamw" || std::string(opt) == "muon")
      CHECK(last(one, "clipped_heads") == 0);
    const double sent = last(two, "comm_bytes");
    INFO("bytes per step " << sent << ", lower bound " << bound);
    CHECK(sent >= bound);
    CHECK(sent <= 1.05 * bound);

    const double single = z1["optimizer_state_bytes"].get<double>();
    for (const auto* z : {&z20, &z21}) {
      const double ratio = (*z)["optimizer_state_bytes"].get<double>() / single;
      INFO("state ratio " << ratio);
      CHECK(ratio > 0.40);
      CHECK(ratio < 0.60);
    }
  }
}

TEST_CASE("2 ranks: resume is bit-for-bit and another world size is refused",
          "[mpi][distributed][resume]") {
  // Every matrix optimizer's sharded state (SOAP: a basis refresh after the resume).
  const std::string opt = GENERATE("muonclip", "normuon", "adamuon", "soap");
  INFO(opt);
  TempDir tmp("mpi_resume");
  const std::string common =
      "--set train.steps=6 --set train.eval_interval=0 --set train.checkpoint_interval=0 "
      "--set optim.soap_precondition_frequency=2 --set optim.name=" +
      opt;
  const fs::path a = tmp.path / "a", b = tmp.path / "b";
  REQUIRE(run_command(train_cmd(2, a.string(), common)).exit_code == 0);
  const auto stop = run_command(train_cmd(2, b.string(), common + " --stop-at 3"));
  INFO(stop.output);
  REQUIRE(stop.exit_code == 0);
  for (const char* f : {"optimizer_rank0.safetensors", "optimizer_rank1.safetensors"})
    CHECK(fs::exists(b / "checkpoints/step_00000003" / f));

  // A single rank cannot take over a 2-rank checkpoint; the run directory stays as it was.
  const std::string before = read_file(b / "metrics.jsonl");
  const auto one =
      run_command(train_cmd(1, b.string(), common + " --set data.batch_size=2 --resume"));
  CHECK(one.exit_code != 0);
  CHECK(one.output.find("saved by 2 rank(s), resumed on 1") != std::string::npos);
  CHECK(read_file(b / "metrics.jsonl") == before);

  const auto cont = run_command(train_cmd(2, b.string(), common + " --resume"));
  INFO(cont.output);
  REQUIRE(cont.exit_code == 0);
  auto losses = [](const fs::path& run) {
    std::vector<std::string> out;
    for (auto& j : read_jsonl(run / "metrics.jsonl"))
      if (j.contains("loss")) out.push_back(j["loss"].dump());
    return out;
  };
  CHECK(losses(a).size() == 6);
  CHECK(losses(a) == losses(b));
  CHECK(read_file(a / "checkpoints/step_00000006/model.safetensors") ==
        read_file(b / "checkpoints/step_00000006/model.safetensors"));
}

TEST_CASE(
    "a rank killed with SIGKILL ends the job non-zero naming the rank and the last "
    "checkpoint stays loadable",
    "[mpi][distributed][faults]") {
  TempDir tmp("mpi_kill");
  const fs::path run = tmp.path / "run";
  const std::string cmd = train_cmd(2, run.string(),
                                    "--set train.steps=100000 --set train.eval_interval=0 "
                                    "--set train.checkpoint_interval=2");
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::execl("/bin/sh", "sh", "-c", (cmd + " > " + (tmp.path / "log").string() + " 2>&1").c_str(),
            static_cast<char*>(nullptr));
    ::_exit(127);
  }
  // Wait for a checkpoint and the ranks' reports (which carry their pids).
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(90);
  auto complete_checkpoints = [&] {
    std::vector<fs::path> cks;
    if (fs::exists(run / "checkpoints"))
      for (const auto& e : fs::directory_iterator(run / "checkpoints"))
        if (e.path().extension() != ".tmp") cks.push_back(e.path());
    std::sort(cks.begin(), cks.end());
    return cks;
  };
  auto ready = [&] {
    return fs::exists(run / "zero1_rank1.json") && !complete_checkpoints().empty();
  };
  while (std::chrono::steady_clock::now() < deadline && !ready())
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  REQUIRE(ready());
  const int victim = read_json(run / "zero1_rank1.json")["pid"].get<int>();
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(::kill(victim, SIGKILL) == 0);
  int status = 0;
  ::waitpid(pid, &status, 0);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const std::string log = read_file(tmp.path / "log");
  INFO(log);
  CHECK(seconds < 60);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) != 0);
  CHECK(log.find("rank 1") != std::string::npos);

  // The newest complete checkpoint loads.
  const auto cks = complete_checkpoints();
  REQUIRE(!cks.empty());
  const auto ev = run_command(binary() + " eval --checkpoint " + cks.back().string());
  INFO(ev.output);
  CHECK(ev.exit_code == 0);
}

TEST_CASE("a rank that fails at start-up prints its error and ends the job within seconds",
          "[mpi][distributed][faults]") {
  TempDir tmp("mpi_startup");
  // Rank 1 alone sees a damaged shard (its copy of the data is corrupt): an MPMD launch gives it
  // its own data.train_pattern.
  const fs::path bad = tmp.path / "bad";
  fs::create_directories(bad);
  std::ofstream(bad / "train_000.bin", std::ios::binary) << std::string(4096, 'x');
  const std::string common =
      ci_args((tmp.path / "run").string()) + " --set optim.warmup_steps=1 --set data.batch_size=2";
  const std::string cmd = mpirun(1) + binary() + " train" + common + " : -np 1 " + binary() +
                          " train" + common +
                          " --set 'data.train_pattern=" + (bad / "train_*.bin").string() + "'";
  const auto t0 = std::chrono::steady_clock::now();
  const auto r = run_command("timeout 120 env " + cmd);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  INFO(r.output);
  CHECK(r.exit_code != 0);
  CHECK(r.exit_code != 124);  // not the timeout
  CHECK(seconds < 30);        // not the 600 s watchdog
  CHECK(r.output.find("error: rank 1 of 2: " + (bad / "train_000.bin").string()) !=
        std::string::npos);
}
