// Run metrics: metrics.jsonl (one JSON object per step and per evaluation) and the loss-spike
// detector (a loss above its running mean by k running standard deviations).
#pragma once

#include <cstdint>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

namespace moetrain {

class SpikeDetector {
 public:
  explicit SpikeDetector(double k = 3.0, double alpha = 0.05, int warmup = 20)
      : k_(k), alpha_(alpha), warmup_(warmup) {}
  // Feeds one loss; returns true if it is a spike. Spikes do not move the running statistics.
  bool observe(double loss);
  std::int64_t spikes() const { return spikes_; }
  nlohmann::json state() const;
  void restore(const nlohmann::json& s);

 private:
  double k_, alpha_;
  int warmup_;
  std::int64_t seen_ = 0, spikes_ = 0;
  double mean_ = 0, var_ = 0;
};

// Appends JSON lines to <run dir>/metrics.jsonl, flushed per line.
class MetricsLog {
 public:
  // When resuming at `resume_step`, lines of later steps (from an interrupted run) are dropped.
  MetricsLog(const std::string& path, std::int64_t resume_step);
  void write(const nlohmann::json& record);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::ofstream out_;
};

}  // namespace moetrain
