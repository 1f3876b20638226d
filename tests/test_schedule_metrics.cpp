// Learning-rate schedules (docs/design.md §4), the loss-spike detector and metrics.jsonl resumption
// (docs/design.md §7).
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "moetrain/lr_schedule.hpp"
#include "moetrain/metrics.hpp"
#include "test_util.hpp"

using namespace moetrain;
using moetrain::test::TempDir;
namespace fs = std::filesystem;

namespace {

OptimConfig schedule(LrSchedule name, int warmup) {
  OptimConfig o;
  o.schedule = name;
  o.lr = 3e-3;
  o.warmup_steps = warmup;
  o.min_lr_ratio = 0.1;
  o.decay_fraction = 0.2;
  return o;
}

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

void write_text(const fs::path& p, const std::string& text) {
  std::ofstream(p, std::ios::binary) << text;
}

}  // namespace

TEST_CASE("lr schedules: linear warm-up lr * (s + 1) / warmup", "[schedule]") {
  for (const LrSchedule name : {LrSchedule::Constant, LrSchedule::Cosine, LrSchedule::Wsd}) {
    INFO(to_string(name));
    const OptimConfig o = schedule(name, 10);
    for (int s = 0; s < 10; ++s)
      CHECK(lr_at(o, s, 100) == Approx(o.lr * (s + 1) / 10.0).epsilon(1e-14));
    // The ramp ends at the full rate and never overshoots it.
    CHECK(lr_at(o, 9, 100) == Approx(o.lr).epsilon(1e-14));
    for (int s = 0; s < 100; ++s) CHECK(lr_at(o, s, 100) <= o.lr * (1 + 1e-14));
  }
}

TEST_CASE("lr schedules: constant stays at lr after warm-up", "[schedule]") {
  const OptimConfig o = schedule(LrSchedule::Constant, 5);
  for (int s = 5; s < 50; ++s) CHECK(lr_at(o, s, 50) == o.lr);
}

TEST_CASE("lr schedules: cosine from lr to lr * min_lr_ratio", "[schedule]") {
  for (const int warmup : {0, 7}) {
    INFO("warmup " << warmup);
    const OptimConfig o = schedule(LrSchedule::Cosine, warmup);
    const int total = warmup + 1 + 100;  // decay over 100 steps: exact half and quarter points
    const double floor = o.lr * o.min_lr_ratio;
    CHECK(lr_at(o, warmup, total) == Approx(o.lr).epsilon(1e-14));
    CHECK(lr_at(o, total - 1, total) == Approx(floor).epsilon(1e-12));
    // Half way through the decay the cosine is at the average of its ends.
    const int mid = warmup + (total - 1 - warmup) / 2;
    REQUIRE(2 * (mid - warmup) == total - 1 - warmup);
    CHECK(lr_at(o, mid, total) == Approx((o.lr + floor) / 2).epsilon(1e-12));
    // A quarter of the way: floor + (lr - floor) * (1 + cos(pi / 4)) / 2.
    if ((total - 1 - warmup) % 4 == 0) {
      const int q = warmup + (total - 1 - warmup) / 4;
      CHECK(lr_at(o, q, total) ==
            Approx(floor + (o.lr - floor) * (1 + std::sqrt(0.5)) / 2).epsilon(1e-12));
    }
    double prev = lr_at(o, warmup, total);
    for (int s = warmup + 1; s < total; ++s) {
      const double cur = lr_at(o, s, total);
      CHECK(cur <= prev);
      CHECK(cur >= floor * (1 - 1e-12));
      prev = cur;
    }
  }
}

TEST_CASE("lr schedules: wsd is stable, then linear to the floor over the last steps",
          "[schedule]") {
  for (const int total : {100, 57}) {
    INFO("total " << total);
    const OptimConfig o = schedule(LrSchedule::Wsd, 10);
    const double floor = o.lr * o.min_lr_ratio;
    const int decay = int(std::lround(o.decay_fraction * total));
    const int start = total - decay;
    REQUIRE(start > o.warmup_steps);
    for (int s = o.warmup_steps; s < start; ++s) CHECK(lr_at(o, s, total) == o.lr);
    // Linear: equal decrements from lr down to exactly the floor at the last step.
    const double step_size = (o.lr - floor) / decay;
    double prev = o.lr;
    for (int s = start; s < total; ++s) {
      const double cur = lr_at(o, s, total);
      CHECK(prev - cur == Approx(step_size).epsilon(1e-9));
      prev = cur;
    }
    CHECK(lr_at(o, total - 1, total) == Approx(floor).epsilon(1e-12));
    // Exactly the last decay_fraction of the steps run below the full rate (after warm-up).
    int below = 0;
    for (int s = o.warmup_steps; s < total; ++s) below += lr_at(o, s, total) < o.lr;
    CHECK(below == decay);
  }
}

TEST_CASE("SpikeDetector: a smooth decreasing loss has no spikes", "[metrics]") {
  SpikeDetector det(3.0, 0.05, 20);
  for (int t = 0; t < 2000; ++t) {
    // Exponential decay with a small wiggle, as a healthy training curve.
    const double loss = 2.0 + 8.0 * std::exp(-t / 300.0) + 0.002 * std::sin(0.7 * t);
    CHECK_FALSE(det.observe(loss));
  }
  CHECK(det.spikes() == 0);
}

TEST_CASE("SpikeDetector: detects a jump after warm-up, and spikes do not move the statistics",
          "[metrics]") {
  auto loss_at = [](int t) { return 5.0 - 0.001 * t + 0.05 * std::sin(1.3 * t); };
  SpikeDetector det(3.0, 0.05, 20);
  SpikeDetector twin(3.0, 0.05, 20);  // sees the same series without the spikes
  for (int t = 0; t < 100; ++t) {
    det.observe(loss_at(t));
    twin.observe(loss_at(t));
  }
  REQUIRE(det.spikes() == 0);
  const nlohmann::json before = det.state();
  CHECK(det.observe(loss_at(100) + 5.0));  // far above any running std of a 0.05 wiggle
  CHECK(det.spikes() == 1);
  CHECK(det.observe(loss_at(100) + 50.0));
  CHECK(det.spikes() == 2);
  // The running statistics are those from before the spikes.
  nlohmann::json after = det.state();
  after["spikes"] = before["spikes"];
  CHECK(after == before);
  // ... and the rest of the series is judged exactly as by the twin that never saw them.
  for (int t = 100; t < 200; ++t) CHECK(det.observe(loss_at(t)) == twin.observe(loss_at(t)));
  nlohmann::json a = det.state(), b = twin.state();
  CHECK(a["spikes"].get<std::int64_t>() == b["spikes"].get<std::int64_t>() + 2);
  a.erase("spikes");
  b.erase("spikes");
  CHECK(a == b);
}

TEST_CASE("SpikeDetector: no spike during warm-up", "[metrics]") {
  SpikeDetector det(3.0, 0.05, 20);
  for (int t = 0; t < 10; ++t) det.observe(3.0 + 0.01 * (t % 2));
  CHECK_FALSE(det.observe(100.0));  // the 11th loss, before the 20-loss warm-up is over
  CHECK(det.spikes() == 0);
}

TEST_CASE("SpikeDetector: state() and restore() continue identically", "[metrics]") {
  auto loss_at = [](int t) {
    return 4.0 * std::exp(-t / 50.0) + 1.0 + 0.1 * std::sin(2.1 * t) + (t % 37 == 36 ? 3.0 : 0.0);
  };
  SpikeDetector a(2.5, 0.1, 10);
  for (int t = 0; t < 80; ++t) a.observe(loss_at(t));
  // As written to trainer_state.json and read back.
  const nlohmann::json saved = nlohmann::json::parse(a.state().dump());
  SpikeDetector b(2.5, 0.1, 10);
  b.restore(saved);
  CHECK(b.spikes() == a.spikes());
  int spikes_after = 0;
  for (int t = 80; t < 200; ++t) {
    const bool sa = a.observe(loss_at(t)), sb = b.observe(loss_at(t));
    CHECK(sa == sb);
    spikes_after += sa;
  }
  CHECK(spikes_after > 0);  // the series has spikes to agree on
  CHECK(a.state() == b.state());
  CHECK(a.spikes() == b.spikes());
}

TEST_CASE("MetricsLog: resuming drops later steps and torn lines, then appends", "[metrics]") {
  TempDir dir("metrics");
  const fs::path path = dir.path / "metrics.jsonl";
  const std::vector<std::string> kept = {
      R"({"step":1,"loss":5.5})",      R"({"step":2,"loss":5.25})",
      R"({"eval_loss":5.0,"step":2})", R"({"config":"header line without a step"})",
      R"({"step":3,"loss":5.0})",
  };
  const std::vector<std::string> later = {
      R"({"step":4,"loss":4.75})",
      R"({"eval_loss":4.5,"step":4})",
      R"({"step":5,"loss":4.5})",
  };
  const std::string torn = R"({"step":6,"lo)";
  std::string text;
  for (const auto& l : kept) text += l + "\n";
  for (const auto& l : later) text += l + "\n";
  text += torn;  // killed mid-write: no newline, not valid JSON
  write_text(path, text);

  {
    MetricsLog log(path.string(), 3);
    CHECK(log.path() == path.string());
    std::string expected;
    for (const auto& l : kept) expected += l + "\n";
    CHECK(read_text(path) == expected);
    log.write({{"step", 4}, {"loss", 4.8}});
    log.write({{"step", 5}, {"loss", 4.7}});
    // Flushed per line: visible before the log is closed.
    std::istringstream lines(read_text(path));
    std::vector<std::string> got;
    for (std::string l; std::getline(lines, l);) got.push_back(l);
    REQUIRE(got.size() == kept.size() + 2);
    for (std::size_t i = 0; i < kept.size(); ++i) CHECK(got[i] == kept[i]);
    CHECK(nlohmann::json::parse(got[kept.size()]) == nlohmann::json{{"step", 4}, {"loss", 4.8}});
    CHECK(nlohmann::json::parse(got[kept.size() + 1]) ==
          nlohmann::json{{"step", 5}, {"loss", 4.7}});
  }
}

TEST_CASE("MetricsLog: resuming with a torn line in the middle keeps the valid rest", "[metrics]") {
  TempDir dir("metrics");
  const fs::path path = dir.path / "metrics.jsonl";
  write_text(path, "{\"step\":1}\n{\"step\":2,\"lo\n{\"step\":3}\n\n{\"step\":7}\n");
  MetricsLog log(path.string(), 5);
  CHECK(read_text(path) == "{\"step\":1}\n{\"step\":3}\n");
}

TEST_CASE("MetricsLog: resuming without a file starts one", "[metrics]") {
  TempDir dir("metrics");
  const fs::path path = dir.path / "metrics.jsonl";
  {
    MetricsLog log(path.string(), 10);
    log.write({{"step", 11}});
  }
  CHECK(read_text(path) == "{\"step\":11}\n");
}
