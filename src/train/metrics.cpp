#include "moetrain/metrics.hpp"

#include <cmath>
#include <filesystem>
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
  seen_ = s.at("seen").get<std::int64_t>();
  spikes_ = s.at("spikes").get<std::int64_t>();
  mean_ = s.at("mean").get<double>();
  var_ = s.at("var").get<double>();
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
  out_.open(path, resume_step >= 0 ? std::ios::app : std::ios::trunc);
  if (!out_) throw std::runtime_error(path + ": cannot open for writing");
}

void MetricsLog::write(const nlohmann::json& record) {
  out_ << record.dump() << '\n';
  out_.flush();
}

}  // namespace moetrain
