// Fault scenarios of a training run, through the built binary (label `faults`): kills at every
// file operation of a checkpoint, two trainers on one run directory, divergence, a full disk, a
// run killed before its first checkpoint, tampered checkpoints, a shard truncated while training,
// and a stop signal during start-up. Each one ends in a clear error or a clean stop, and what was
// already written stays usable.
#include <catch2/catch.hpp>

#include <signal.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <functional>
#include <regex>
#include <sstream>
#include <thread>

#include "cli_fixture.hpp"
#include "moetrain/checkpoint.hpp"
#include "moetrain/safetensors.hpp"

using namespace moetrain::test;
using moetrain::incomplete_reason;
using moetrain::list_checkpoints;

namespace {

using Clock = std::chrono::steady_clock;

// configs/ci.json on the test corpus: a one-step warm-up, no evaluation, a checkpoint every step
// and only the newest kept, so every step writes one checkpoint and deletes one.
std::string train_cmd(const std::string& out_dir, const std::string& extra = "") {
  return binary() + " train" + ci_args(out_dir) +
         " --set optim.warmup_steps=1 --set train.eval_interval=0 --set train.steps=3"
         " --set train.checkpoint_interval=1 --set train.keep_checkpoints=1 " +
         extra;
}

// A process running `cmd` through sh, its output in `log`.
pid_t spawn(const std::string& cmd, const fs::path& log) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::execl("/bin/sh", "sh", "-c", ("exec " + cmd + " > " + log.string() + " 2>&1").c_str(),
            static_cast<char*>(nullptr));
    ::_exit(127);
  }
  return pid;
}

// Exit code of a child (128 + signal when killed).
int wait_exit(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

bool wait_for(const std::function<bool()>& ready, double seconds) {
  const auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
  while (Clock::now() < deadline) {
    if (ready()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return ready();
}

// Every directory with a final checkpoint name is complete.
void check_final_names_complete(const fs::path& run) {
  for (const auto& ck : list_checkpoints(run.string())) {
    INFO(ck);
    CHECK_FALSE(incomplete_reason(ck).has_value());
  }
}

// `moetrain eval` loads checkpoint `dir` and gives a finite loss.
void check_evaluates(const std::string& dir) {
  const auto ev = run_command(binary() + " eval --checkpoint " + dir);
  INFO(ev.output);
  CHECK(ev.exit_code == 0);
}

std::vector<nlohmann::json> metrics_lines(const fs::path& run) {
  return read_jsonl(run / "metrics.jsonl");  // throws on a torn line
}

}  // namespace

TEST_CASE("faults: a kill at any file operation of a checkpoint leaves only complete ones",
          "[faults][checkpoint]") {
  TempDir tmp("faults_kill");
  // The file operations of a whole run, in order; MOETRAIN_KILL_AT_FILE_OP=N stops at the N-th.
  const auto trace =
      run_command("MOETRAIN_TRACE_FILE_OPS=1 " + train_cmd((tmp.path / "trace").string()));
  REQUIRE(trace.exit_code == 0);
  // Kill at each operation of the second checkpoint: its writes, its commit, and the deletion of
  // the first (renamed aside, then each unlink).
  std::vector<int> points;
  const std::regex op("file operation ([0-9]+): (.*)");
  std::istringstream lines(trace.output);
  for (std::string line; std::getline(lines, line);) {
    std::smatch m;
    if (std::regex_search(line, m, op) &&
        (m[2].str().find("step_00000002") != std::string::npos ||
         m[2].str().find("step_00000001.deleting") != std::string::npos))
      points.push_back(std::stoi(m[1]));
  }
  INFO(trace.output);
  REQUIRE(points.size() >= 10);
  for (int n : points) {
    const fs::path run = tmp.path / ("kill_at_" + std::to_string(n) + "_run");
    const auto r = run_command("MOETRAIN_KILL_AT_FILE_OP=" + std::to_string(n) + " " +
                               train_cmd(run.string()));
    INFO("kill at file operation " << n << "\n" << r.output);
    REQUIRE(r.exit_code == 128 + SIGKILL);
    check_final_names_complete(run);
    CHECK_FALSE(list_checkpoints(run.string()).empty());
    // The newest complete checkpoint resumes, the run finishes, and the leftovers are gone.
    const auto res = run_command(train_cmd(run.string(), "--resume"));
    INFO(res.output);
    CHECK(res.exit_code == 0);
    std::vector<std::string> entries;
    for (const auto& e : fs::directory_iterator(run / "checkpoints"))
      entries.push_back(e.path().filename().string());
    CHECK(entries == std::vector<std::string>{"step_00000003"});
    fs::remove_all(run);
  }
}

TEST_CASE("faults: a second trainer on the same run directory is refused", "[faults][lock]") {
  TempDir tmp("faults_lock");
  const fs::path run = tmp.path / "run";
  const pid_t first = spawn(train_cmd(run.string(),
                                      "--set train.steps=100000 "
                                      "--set train.checkpoint_interval=5"),
                            tmp.path / "first.log");
  REQUIRE(wait_for([&] { return !list_checkpoints(run.string()).empty(); }, 60));
  for (const char* extra : {"", "--resume"}) {
    const auto r = run_command(train_cmd(run.string(), extra));
    INFO(r.output);
    CHECK(r.exit_code == 1);
    CHECK(r.output.find("in use by another trainer (PID " + std::to_string(first)) !=
          std::string::npos);
  }
  REQUIRE(::kill(first, SIGTERM) == 0);
  CHECK(wait_exit(first) == 0);
  // Every metrics line is whole, and the lock went with the first trainer.
  const auto lines = metrics_lines(run);
  for (std::size_t i = 0; i < lines.size(); ++i) CHECK(lines[i]["step"] == int(i) + 1);
  const auto r =
      run_command(train_cmd(run.string(), "--set train.steps=100000 --stop-at " +
                                              std::to_string(lines.size() + 1) + " --resume"));
  INFO(r.output);
  CHECK(r.exit_code == 0);
}

TEST_CASE("faults: divergence never leaves a bad checkpoint as the newest", "[faults][diverge]") {
  TempDir tmp("faults_diverge");
  const fs::path run = tmp.path / "run";
  // AdamW at a learning rate that overflows within a few steps of its warm-up (the loss grows
  // by about 10^3 a step until a gradient or the loss is no longer finite).
  const auto r = run_command(train_cmd(run.string(),
                                       "--set train.steps=12 --set optim.warmup_steps=12 "
                                       "--set optim.name=adamw --set optim.lr=1000 "
                                       "--set optim.grad_clip=0"));
  INFO(r.output);
  REQUIRE(r.exit_code == 1);
  CHECK(r.output.find("non-finite") != std::string::npos);
  const auto cks = list_checkpoints(run.string());
  REQUIRE(cks.size() == 1);  // keep_checkpoints 1, and it is a good one
  std::smatch m;
  REQUIRE(std::regex_search(r.output, m, std::regex("at (?:optimizer )?step ([0-9]+)")));
  const int failed = std::stoi(m[1]);
  CHECK(cks[0] == moetrain::checkpoint_path(run.string(), failed - 2));
  // The checkpoint of the step before the failure was moved aside: its weights gave the NaN.
  CHECK(fs::is_directory(moetrain::checkpoint_path(run.string(), failed - 1) + ".diverged"));
  CHECK(r.output.find("--resume continues from " + cks[0]) != std::string::npos);
  check_evaluates(cks[0]);
  // A lower learning rate continues from it.
  const auto res = run_command(train_cmd(run.string(),
                                         "--set train.steps=12 --set optim.warmup_steps=12 "
                                         "--set optim.name=adamw --set optim.lr=0.003 "
                                         "--set optim.grad_clip=0 --resume"));
  INFO(res.output);
  CHECK(res.exit_code == 0);
}

TEST_CASE("faults: a full disk stops the run with a clear error and no torn record",
          "[faults][disk]") {
  TempDir tmp("faults_disk");
  const fs::path mnt = tmp.path / "small";
  fs::create_directories(mnt);
  if (::geteuid() != 0 || ::mount("tmpfs", mnt.c_str(), "tmpfs", 0, "size=256k") != 0) {
    WARN("not run: a small tmpfs needs root (CAP_SYS_ADMIN) to mount");
    return;
  }
  struct Unmount {
    fs::path p;
    ~Unmount() { ::umount2(p.c_str(), MNT_DETACH); }
  } unmount{mnt};
  const fs::path run = mnt / "run";
  // No periodic checkpoint: metrics.jsonl grows until the 256 KiB are full.
  const auto r = run_command(
      train_cmd(run.string(), "--set train.steps=100000 --set train.checkpoint_interval=0"));
  INFO(r.output);
  CHECK(r.exit_code == 1);
  CHECK(r.output.find((run / "metrics.jsonl").string() + ": cannot append a record (No space") !=
        std::string::npos);
  CHECK(r.output.find("checkpoint") != std::string::npos);  // the attempt is reported
  const auto lines = metrics_lines(run);                    // no torn last line
  REQUIRE(!lines.empty());
  for (std::size_t i = 0; i < lines.size(); ++i) CHECK(lines[i]["step"] == int(i) + 1);
  check_final_names_complete(run);
}

TEST_CASE("faults: a run killed before its first checkpoint does not block a fresh start",
          "[faults][stale]") {
  TempDir tmp("faults_stale");
  const fs::path run = tmp.path / "run";
  const auto killed = run_command("MOETRAIN_KILL_AT_FILE_OP=3 " + train_cmd(run.string()));
  REQUIRE(killed.exit_code == 128 + SIGKILL);  // config.json written, killed at checkpoint 1
  REQUIRE(fs::exists(run / "metrics.jsonl"));
  REQUIRE(list_checkpoints(run.string()).empty());
  const std::string stale = read_file(run / "metrics.jsonl");
  const auto r = run_command(train_cmd(run.string()));
  INFO(r.output);
  CHECK(r.exit_code == 0);
  CHECK(r.output.find("moved it to") != std::string::npos);
  CHECK(read_file(run / "metrics.jsonl.stale") == stale);
  CHECK(metrics_lines(run).size() == 3);
}

TEST_CASE("faults: tampered trainer states and mixed checkpoint pieces are refused",
          "[faults][resume]") {
  TempDir tmp("faults_state");
  const fs::path run = tmp.path / "run";
  REQUIRE(run_command(train_cmd(run.string(), "--set train.keep_checkpoints=3")).exit_code == 0);
  const fs::path ck = moetrain::checkpoint_path(run.string(), 3);
  const fs::path other = moetrain::checkpoint_path(run.string(), 2);
  const auto state = nlohmann::json::parse(read_file(ck / "trainer_state.json"));

  auto refused = [&](const fs::path& dir, const std::string& expect) {
    const auto r =
        run_command(train_cmd(run.string(), "--set train.steps=5 --resume-from " + dir.string()));
    INFO(r.output);
    CHECK(r.exit_code == 1);
    CHECK(r.output.find(expect) != std::string::npos);
  };
  int i = 0;
  auto tampered = [&](const std::function<void(nlohmann::json&)>& edit) {
    const fs::path dir = tmp.path / ("tampered_" + std::to_string(i++) + "_state");
    fs::copy(ck, dir);
    nlohmann::json st = state;
    edit(st);
    std::ofstream(dir / "trainer_state.json") << st.dump();
    return dir;
  };
  for (const nlohmann::json& step : {nlohmann::json(-5), nlohmann::json(1.5),
                                     nlohmann::json(std::int64_t(1) << 62), nlohmann::json(6)})
    refused(tampered([&](nlohmann::json& st) { st["step"] = step; }), "step is " + step.dump());
  refused(tampered([](nlohmann::json& st) { st["tokens_seen"] = -1; }), "tokens_seen is -1");
  refused(tampered([](nlohmann::json& st) { st["loader"]["cursor"] = -1; }), "cursor");
  refused(tampered([](nlohmann::json& st) { st["spike"]["seen"] = -3; }), "spike.seen");
  refused(tampered([](nlohmann::json& st) { st["expert_bias"][1][0] = nullptr; }), "expert_bias");

  // Pieces of another step: the optimizer shard, then the model.
  for (const char* piece : {"optimizer_rank0.safetensors", "model.safetensors"}) {
    const fs::path dir = tmp.path / ("mixed_" + std::string(piece));
    fs::copy(ck, dir);
    fs::copy_file(other / piece, dir / piece, fs::copy_options::overwrite_existing);
    refused(dir, (dir / piece).string() + ": its step is 2 but trainer_state.json says 3");
  }
  // The untouched checkpoint still resumes.
  const auto ok =
      run_command(train_cmd(run.string(), "--set train.steps=4 --resume-from " + ck.string()));
  INFO(ok.output);
  CHECK(ok.exit_code == 0);
}

TEST_CASE("faults: safetensors whose tensors overlap or leave gaps are refused", "[faults][io]") {
  TempDir tmp("faults_st");
  // Two tensors on the same 16 bytes, and 16 bytes that belong to none: the byte total matches.
  const std::string header = R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                             R"("b":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})";
  std::string file(8, '\0');
  for (int i = 0; i < 8; ++i) file[std::size_t(i)] = char((header.size() >> (8 * i)) & 0xff);
  file += header + std::string(32, '\0');
  const fs::path p = tmp.path / "overlap.safetensors";
  std::ofstream(p, std::ios::binary) << file;
  REQUIRE_THROWS_WITH(moetrain::load_safetensors(p.string()),
                      Catch::Contains(p.string()) && Catch::Contains("overlaps"));
}

TEST_CASE("faults: a shard truncated while training is an error naming it", "[faults][data]") {
  TempDir tmp("faults_shard");
  // A private copy of the corpus, so the test can damage it.
  const fs::path data = tmp.path / "data";
  fs::copy(prepared_corpus(), data);
  const fs::path run = tmp.path / "run";
  const std::string cmd = binary() + " train" + ci_args(run.string()) +
                          " --set 'data.train_pattern=" + (data / "train_*.bin").string() +
                          "' --set optim.warmup_steps=1 --set train.eval_interval=0"
                          " --set train.steps=100000 --set train.checkpoint_interval=2";
  const pid_t pid = spawn(cmd, tmp.path / "log");
  REQUIRE(wait_for([&] { return !list_checkpoints(run.string()).empty(); }, 60));
  // `cp` over a shard truncates it in place, then writes: here it stops after the header.
  std::vector<fs::path> shards;
  for (const auto& e : fs::directory_iterator(data))
    if (e.path().filename().string().rfind("train_", 0) == 0) shards.push_back(e.path());
  for (const auto& s : shards) fs::resize_file(s, 1024);
  const int rc = wait_exit(pid);
  const std::string log = read_file(tmp.path / "log");
  INFO(log);
  CHECK(rc == 1);
  CHECK(log.find("changed on disk while in use") != std::string::npos);
  CHECK(log.find(data.string()) != std::string::npos);
  check_final_names_complete(run);
  check_evaluates(list_checkpoints(run.string()).back());
}

TEST_CASE("faults: SIGTERM during start-up ends the process at once", "[faults][signal]") {
  TempDir tmp("faults_startup");
  const fs::path run = tmp.path / "run";
  // A model whose initialisation takes seconds (about 25M parameters).
  const pid_t pid = spawn(train_cmd(run.string(),
                                    "--set model.d_model=384 --set model.n_layers=4 "
                                    "--set model.moe.expert_ff=2048 --set model.dense_ff=2048 "
                                    "--set model.n_heads=6 --set model.n_kv_heads=6"),
                          tmp.path / "log");
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const auto t0 = Clock::now();
  REQUIRE(::kill(pid, SIGTERM) == 0);
  const int rc = wait_exit(pid);
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  const std::string log = read_file(tmp.path / "log");
  INFO(log);
  CHECK(rc == 128 + SIGTERM);
  CHECK(seconds < 2.0);
  CHECK(log.find("SIGTERM during start-up") != std::string::npos);
  CHECK(list_checkpoints(run.string()).empty());
}
