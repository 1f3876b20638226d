// Data parallelism with `mpirun -np 2` (docs/design.md §5): the result contract against one rank,
// ZeRO-1's split of the optimizer (each Muon matrix orthogonalised once, about half the state per
// rank), bit-for-bit resume on 2 ranks, refusal of another world size, and a killed rank ending the
// job. Built twice (docs/design.md §6.5):
//   * moetrain_tests: the moetrain binary on the CPU backend, over MpiComm;
//   * moetrain_simt_distributed_tests (SIMT build, MOETRAIN_DISTRIBUTED_NCCL): moetrain_simt, the
//     CUDA backend in the simulator, over NcclComm on the simulator's NCCL (tests/simt/nccl_shim),
//     every multi-rank run under both stream schedules (eager and deferred).
#include <catch2/catch.hpp>

#include <signal.h>

#include <chrono>
#include <cmath>
#include <initializer_list>
#include <set>
#include <sstream>
#include <thread>

#include "cli_fixture.hpp"
#include "moetrain/safetensors.hpp"

using namespace moetrain::test;

namespace {

#if defined(MOETRAIN_DISTRIBUTED_NCCL)
constexpr bool kNccl = true;
// The simulator's stream schedules (MOETRAIN_SIMT_STREAMS).
const std::vector<std::string> kSchedules = {"eager", "deferred"};
#else
constexpr bool kNccl = false;
const std::vector<std::string> kSchedules = {""};  // the CPU has no streams
#endif

// What every run of the job adds on the simulated GPU: the GPU backend, or an error (never a quiet
// fall-back to the CPU).
const std::string kBackend = kNccl ? " --set train.backend=cuda" : "";

// OpenMPI refuses root without these; 2 ranks on 2 cores with one OpenMP thread each. On the
// simulated GPU the node has 2 GPUs (MOETRAIN_SIMT_DEVICES), one per rank as NCCL requires, and
// LeakSanitizer is off: Open MPI and the components it dlopens leak at MPI_Finalize, unloaded by
// then, so no suppression can name them (ASan's memory checks stay on).
// The environment of one app context of mpirun (an MPMD launch names it in each).
std::string rank_env(const std::string& schedule) {
  std::string env = "-x OMP_NUM_THREADS=1 ";
  if (kNccl)
    env += "-x MOETRAIN_SIMT_STREAMS=" + schedule +
           " -x MOETRAIN_SIMT_DEVICES=2 -x ASAN_OPTIONS=detect_leaks=0 ";
  return env;
}

std::string mpirun(int ranks, const std::string& schedule = kSchedules.front()) {
  return "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun -np " +
         std::to_string(ranks) + " --oversubscribe --bind-to none " + rank_env(schedule);
}

// One process without mpirun (a world of one).
std::string single(const std::string& schedule = kSchedules.front()) {
  return kNccl ? "OMP_NUM_THREADS=1 MOETRAIN_SIMT_STREAMS=" + schedule + " " : "OMP_NUM_THREADS=1 ";
}

// The same global batch of 4 sequences, as 1 x 4 or 2 x 2.
std::string train_cmd(int ranks, const std::string& out, const std::string& extra,
                      const std::string& schedule = kSchedules.front()) {
  const std::string batch = ranks == 1 ? "4" : "2";
  const std::string launcher = ranks == 1 ? single(schedule) : mpirun(ranks, schedule);
  return launcher + binary() + " train" + ci_args(out) + kBackend +
         " --set optim.warmup_steps=1 --set data.batch_size=" + batch + " " + extra;
}

nlohmann::json read_json(const fs::path& p) {
  return nlohmann::json::parse(read_file(p));
}

// The losses a run logged, as written (exact bits).
std::vector<std::string> losses_of(const fs::path& run) {
  std::vector<std::string> out;
  for (auto& j : read_jsonl(run / "metrics.jsonl"))
    if (j.contains("loss")) out.push_back(j["loss"].dump());
  return out;
}

// The result contract of data parallelism for each optimizer case of `cases` (named below).
void check_contract(std::initializer_list<const char*> cases) {
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
  // On the simulated GPU every optimizer runs the same micro-batches on one rank as on two, and the
  // results must be the same bits: in bf16 mode (the GPU's default) each micro-batch's gradients
  // are computed in full and then added to the accumulated ones, so one rank's g0 + g1 is the
  // reduce-scatter's sum of the two ranks' gradients. (With batch B against 2 x B/2 the bf16
  // operands of attention, the expert GEMMs and Newton-Schulz's Gram products turn the rounding
  // of a different summation order into differences of 1e-3 after 5 steps: measured 6e-4 for
  // AdamW and 1.4e-2 for AdaMuon.)
  for (const char* opt : cases) {
    INFO(opt);
    const bool adamw_clip = std::string(opt) == "adamw_qk_clip";
    const bool soap_rotated = std::string(opt) == "soap";
    const fs::path one = tmp.path / (std::string(opt) + "_1");
    std::string extra = common + " --set optim.name=" + std::string(opt);
    if (adamw_clip) extra = common + " --set optim.name=adamw --set optim.qk_clip=true";
    if (std::string(opt) == "soap_unrotated")
      extra = common + " --set optim.name=soap --set optim.soap_max_precond_dim=1";
    const bool soap = soap_rotated || std::string(opt) == "soap_unrotated";
    const std::string same_batches =
        soap || kNccl ? " --set data.batch_size=2 --set train.grad_accum=2" : "";
    const auto r1 = run_command(train_cmd(1, one.string(), extra + same_batches));
    INFO(r1.output);
    REQUIRE(r1.exit_code == 0);
    std::string first_weights;  // the 2-rank weights under the first stream schedule
    for (const std::string& schedule : kSchedules) {
      INFO("stream schedule " << (kNccl ? schedule : "none (CPU)"));
      const fs::path two = tmp.path / (std::string(opt) + "_2" + schedule);
      const auto r2 = run_command(train_cmd(2, two.string(), extra, schedule));
      INFO(r2.output);
      REQUIRE(r2.exit_code == 0);

      const auto a = moetrain::load_safetensors(
          (one / "checkpoints/step_00000005/model.safetensors").string());
      const auto b = moetrain::load_safetensors(
          (two / "checkpoints/step_00000005/model.safetensors").string());
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
      CHECK(worst <= (kNccl ? 0.0 : soap_rotated ? 1e-3 : 1e-5));
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
          CHECK(std::abs(l1[i] - l2[i]) <= (kNccl ? 0.0 : 1e-6) * std::abs(l1[i]));
        }
      }

      // ZeRO-1: every Muon matrix is owned, and orthogonalised, by exactly one rank; each rank
      // holds about half the optimizer state of the single rank.
      const auto z1 = read_json(one / "zero1_rank0.json");
      const auto z20 = read_json(two / "zero1_rank0.json"),
                 z21 = read_json(two / "zero1_rank1.json");
      const auto all = z1["owned_muon_matrices"].get<std::vector<std::string>>();
      auto m0 = z20["owned_muon_matrices"].get<std::vector<std::string>>();
      auto m1 = z21["owned_muon_matrices"].get<std::vector<std::string>>();
      std::set<std::string> joined(m0.begin(), m0.end());
      for (const auto& m : m1) CHECK(joined.insert(m).second);  // disjoint
      CHECK(joined == std::set<std::string>(all.begin(), all.end()));
      CHECK(z20["orthogonalised_last_step"].get<int>() +
                z21["orthogonalised_last_step"].get<int>() ==
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

      // The communicator each run used, and on the simulated GPU: the same bits under both stream
      // schedules (a schedule changes when work runs, never what it computes).
      CHECK(z1["communicator"] == "local");
      CHECK(z20["communicator"] == (kNccl ? "nccl" : "mpi"));
      CHECK(z21["communicator"] == (kNccl ? "nccl" : "mpi"));
      const std::string weights = read_file(two / "checkpoints/step_00000005/model.safetensors");
      if (first_weights.empty())
        first_weights = weights;
      else
        CHECK(weights == first_weights);
    }
  }
}

}  // namespace

// One case per optimizer family, so that CTest runs them side by side.
TEST_CASE(
    "2 ranks with batch B/2 match 1 rank with batch B after 5 steps of AdamW with and "
    "without QK-clip",
    "[mpi][distributed]") {
  check_contract({"adamw", "adamw_qk_clip"});
}

TEST_CASE("2 ranks with batch B/2 match 1 rank with batch B after 5 steps of Muon and MuonClip",
          "[mpi][distributed]") {
  check_contract({"muon", "muonclip"});
}

TEST_CASE("2 ranks with batch B/2 match 1 rank with batch B after 5 steps of NorMuon and AdaMuon",
          "[mpi][distributed]") {
  check_contract({"normuon", "adamuon"});
}

TEST_CASE(
    "2 ranks with batch B/2 match 1 rank with batch B after 5 steps of SOAP rotated and "
    "unrotated",
    "[mpi][distributed]") {
  check_contract({"soap", "soap_unrotated"});
}

TEST_CASE("2 ranks: gradient buckets overlapped with backward give the serial path's bits",
          "[mpi][distributed][buckets]") {
  TempDir tmp("mpi_overlap");
  // 10 KiB buckets (several per layer), two micro-batches (only the last one's backward starts
  // buckets), MuonClip (AdamW pieces and matrix owners in the buckets). The serial path starts the
  // same reduce-scatters after backward; it runs once (under the first schedule), the overlapped
  // path under each: the deferred schedule is where a missing event would show.
  const std::string common =
      "--set train.steps=5 --set train.eval_interval=0 --set optim.name=muonclip "
      "--set train.grad_accum=2 --set train.grad_bucket_mib=0.01";
  const fs::path serial = tmp.path / "serial";
  const auto a =
      run_command(train_cmd(2, serial.string(), common + " --set train.overlap_grad_reduce=false"));
  INFO(a.output);
  REQUIRE(a.exit_code == 0);
  CHECK(losses_of(serial).size() == 5);
  for (const std::string& schedule : kSchedules) {
    INFO("stream schedule " << (kNccl ? schedule : "none (CPU)"));
    const fs::path overlap = tmp.path / ("ovl" + schedule);
    const auto b = run_command(train_cmd(2, overlap.string(), common, schedule));
    INFO(b.output);
    REQUIRE(b.exit_code == 0);
    CHECK(read_json(overlap / "zero1_rank0.json")["grad_buckets"].get<int>() > 4);
    CHECK(read_file(serial / "checkpoints/step_00000005/model.safetensors") ==
          read_file(overlap / "checkpoints/step_00000005/model.safetensors"));
    CHECK(losses_of(serial) == losses_of(overlap));
  }
}

TEST_CASE("2 ranks: resume is bit-for-bit and another world size is refused",
          "[mpi][distributed][resume]") {
  // Every matrix optimizer's sharded state (SOAP: a basis refresh after the resume).
  const std::vector<std::string> opts = {"muonclip", "normuon", "adamuon", "soap"};
  const std::size_t k = GENERATE(0, 1, 2, 3);
  const std::string& opt = opts[k];
  INFO(opt);
  TempDir tmp("mpi_resume");
  const std::string common =
      "--set train.steps=6 --set train.eval_interval=0 --set train.checkpoint_interval=0 "
      "--set optim.soap_precondition_frequency=2 --set optim.name=" +
      opt;
  const fs::path a = tmp.path / "a";
  REQUIRE(run_command(train_cmd(2, a.string(), common)).exit_code == 0);
  CHECK(losses_of(a).size() == 6);
  // On the simulated GPU the uninterrupted run is under the first schedule; the interrupted one
  // stops under one schedule and resumes under the other (eager then deferred for the even
  // optimizers, deferred then eager for the odd): a resume gives the same bits whichever schedule
  // ran either half, and each schedule runs both halves over the four optimizers.
  const std::string first = kSchedules[k % kSchedules.size()],
                    second = kSchedules[(k + 1) % kSchedules.size()];
  INFO("stream schedules " << (kNccl ? first + " then " + second : "none (CPU)"));
  const fs::path b = tmp.path / "b";
  const auto stop = run_command(train_cmd(2, b.string(), common + " --stop-at 3", first));
  INFO(stop.output);
  REQUIRE(stop.exit_code == 0);
  for (const char* f : {"optimizer_rank0.safetensors", "optimizer_rank1.safetensors"})
    CHECK(fs::exists(b / "checkpoints/step_00000003" / f));

  // A single rank cannot take over a 2-rank checkpoint; the run directory stays as it was.
  const std::string before = read_file(b / "metrics.jsonl");
  const auto one =
      run_command(train_cmd(1, b.string(), common + " --set data.batch_size=2 --resume", second));
  CHECK(one.exit_code != 0);
  CHECK(one.output.find("saved by 2 rank(s), resumed on 1") != std::string::npos);
  CHECK(read_file(b / "metrics.jsonl") == before);

  const auto cont = run_command(train_cmd(2, b.string(), common + " --resume", second));
  INFO(cont.output);
  REQUIRE(cont.exit_code == 0);
  CHECK(losses_of(a) == losses_of(b));
  CHECK(read_file(a / "checkpoints/step_00000006/model.safetensors") ==
        read_file(b / "checkpoints/step_00000006/model.safetensors"));
}

TEST_CASE(
    "a rank killed with SIGKILL ends the job non-zero naming the rank and the last "
    "checkpoint stays loadable",
    "[mpi][distributed][faults]") {
  TempDir tmp("mpi_kill");
  for (const std::string& schedule : kSchedules) {
    INFO("stream schedule " << (kNccl ? schedule : "none (CPU)"));
    const fs::path run = tmp.path / ("run" + schedule), log_file = tmp.path / ("log" + schedule);
    const std::string cmd = train_cmd(2, run.string(),
                                      "--set train.steps=100000 --set train.eval_interval=0 "
                                      "--set train.checkpoint_interval=2",
                                      schedule);
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      ::execl("/bin/sh", "sh", "-c", (cmd + " > " + log_file.string() + " 2>&1").c_str(),
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
    const std::string log = read_file(log_file);
    INFO(log);
    CHECK(seconds < 60);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) != 0);
    CHECK(log.find("rank 1") != std::string::npos);

    // The newest complete checkpoint loads.
    const auto cks = complete_checkpoints();
    REQUIRE(!cks.empty());
    const auto ev =
        run_command(single(schedule) + binary() + " eval --checkpoint " + cks.back().string());
    INFO(ev.output);
    CHECK(ev.exit_code == 0);
  }
}

TEST_CASE("a rank that fails at start-up prints its error and ends the job within seconds",
          "[mpi][distributed][faults]") {
  TempDir tmp("mpi_startup");
  // Rank 1 alone sees a damaged shard (its copy of the data is corrupt): an MPMD launch gives it
  // its own data.train_pattern.
  const fs::path bad = tmp.path / "bad";
  fs::create_directories(bad);
  std::ofstream(bad / "train_000.bin", std::ios::binary) << std::string(4096, 'x');
  for (const std::string& schedule : kSchedules) {
    INFO("stream schedule " << (kNccl ? schedule : "none (CPU)"));
    const std::string common = ci_args((tmp.path / ("run" + schedule)).string()) + kBackend +
                               " --set optim.warmup_steps=1 --set data.batch_size=2";
    const std::string cmd = mpirun(1, schedule) + binary() + " train" + common + " : -np 1 " +
                            rank_env(schedule) + binary() + " train" + common +
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
}

#if defined(MOETRAIN_DISTRIBUTED_NCCL)
TEST_CASE("NCCL refuses two ranks on a node with one GPU at start-up and names the limit",
          "[mpi][distributed][faults]") {
  TempDir tmp("nccl_one_gpu");
  const std::string cmd = "timeout 120 env " + mpirun(2) + "-x MOETRAIN_SIMT_DEVICES=1 " +
                          binary() + " train" + ci_args((tmp.path / "run").string()) + kBackend;
  const auto r = run_command(cmd);
  INFO(r.output);
  CHECK(r.exit_code != 0);
  CHECK(r.exit_code != 124);
  CHECK(r.output.find("has 1 GPU(s) visible but 2 ranks") != std::string::npos);
  CHECK(r.output.find("launch at most 1 ranks per node") != std::string::npos);
  CHECK_FALSE(fs::exists(tmp.path / "run" / "metrics.jsonl"));
}
#endif
