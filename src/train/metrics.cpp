#include "moetrain/metrics.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "moetrain/atomic_file.hpp"

namespace moetrain {

bool SpikeDetector::observe(double loss) {
  const bool spike = seen_ >= warmup_ && loss > mean_ + k_ * std::sqrt(std::max(var_, 0.0));
  if (spike) {
    ++spikes_;
    return true;
  }
  if (seen_ == 0) {
    mean_ = loss;
    var_ = 0;
  } else {
    const double d = loss - mean_;
    mean_ += alpha_ * d;
    var_ = (1 - alpha_) * (var_ + alpha_ * d * d);
  }
  ++seen_;
  return false;
}

nlohmann::json SpikeDetector::state() const {
  return {{"seen", seen_}, {"spikes", spikes_}, {"mean", mean_}, {"var", var_}};
}

void SpikeDetector::restore(const nlohmann::json& s) {
  auto count = [&](const char* key) {
    const nlohmann::json& v = s.at(key);
    if (!v.is_number_integer() || v.get<std::int64_t>() < 0)
      throw std::runtime_error(std::string("spike.") + key +
                               ": expected a non-negative integer, got " + v.dump());
    return v.get<std::int64_t>();
  };
  auto finite = [&](const char* key) {
    const nlohmann::json& v = s.at(key);
    if (!v.is_number() || !std::isfinite(v.get<double>()))
      throw std::runtime_error(std::string("spike.") + key + ": expected a finite number, got " +
                               v.dump());
    return v.get<double>();
  };
  const std::int64_t seen = count("seen"), spikes = count("spikes");
  const double mean = finite("mean"), var = finite("var");
  if (var < 0) throw std::runtime_error("spike.var: expected a non-negative number");
  seen_ = seen;
  spikes_ = spikes;
  mean_ = mean;
  var_ = var;
}

MetricsLog::MetricsLog(const std::string& path, std::int64_t resume_step) : path_(path) {
  if (resume_step >= 0 && std::filesystem::exists(path)) {
    std::ifstream in(path);
    std::ostringstream kept;
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty()) continue;
      try {
        const auto j = nlohmann::json::parse(line);
        if (j.contains("step") && j["step"].get<std::int64_t>() > resume_step) continue;
      } catch (const std::exception&) {
        continue;  // a torn last line of a killed run
      }
      kept << line << '\n';
    }
    write_text_atomically(path, kept.str());
  }
  fd_ =
      ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | (resume_step >= 0 ? 0 : O_TRUNC), 0644);
  if (fd_ < 0)
    throw std::runtime_error(path + ": cannot open for writing: " + std::strerror(errno));
  const off_t end = ::lseek(fd_, 0, SEEK_END);
  if (end < 0) {
    const int err = errno;
    ::close(fd_);
    throw std::runtime_error(path + ": cannot seek: " + std::strerror(err));
  }
  size_ = end;
}

MetricsLog::~MetricsLog() {
  if (fd_ >= 0) ::close(fd_);
}

void MetricsLog::write(const nlohmann::json& record) {
  const std::string line = record.dump() + "\n";
  std::size_t done = 0;
  while (done < line.size()) {
    const ssize_t n = ::pwrite(fd_, line.data() + done, line.size() - done, size_ + off_t(done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = n < 0 ? errno : EIO;
      // Back to the last complete line, so the file never ends in a torn record.
      const bool cut = ::ftruncate(fd_, size_) == 0;
      throw MetricsWriteError(path_ + ": cannot append a record (" + std::strerror(err) + ")" +
                              (cut ? "" : "; its last line may be torn"));
    }
    done += std::size_t(n);
  }
  size_ += off_t(line.size());
}

std::optional<std::string> set_stale_metrics_aside(const std::string& path) {
  namespace fs = std::filesystem;
  if (!fs::exists(path)) return std::nullopt;
  std::string aside = path + ".stale";
  for (int i = 2; fs::exists(aside); ++i) aside = path + ".stale" + std::to_string(i);
  fs::rename(path, aside);
  return aside;
}

}  // namespace moetrain
