// Run metrics: metrics.jsonl (one JSON object per step and per evaluation) and the loss-spike
// detector (a loss above its running mean by k running standard deviations).
#pragma once

#include <sys/types.h>
#include <cstdint>

#include <optional>
#include <stdexcept>
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

// A record that could not be written (a full disk, an I/O error).
class MetricsWriteError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Appends JSON lines to <run dir>/metrics.jsonl, each with one write. A failed write is never
// silent: the file is cut back to its last complete line and MetricsWriteError is thrown.
class MetricsLog {
 public:
  // When resuming at `resume_step`, lines of later steps (from an interrupted run) are dropped.
  MetricsLog(const std::string& path, std::int64_t resume_step);
  ~MetricsLog();
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;
  void write(const nlohmann::json& record);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
  off_t size_ = 0;  // bytes of complete lines
};

// Renames the metrics of a run that was killed before its first checkpoint (nothing can resume
// them) to <path>.stale (or .stale2, ...); returns the new name, nullopt when there is no file.
std::optional<std::string> set_stale_metrics_aside(const std::string& path);

}  // namespace moetrain
