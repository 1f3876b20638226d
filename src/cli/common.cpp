#include "cli/common.hpp"

#include <charconv>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <stdexcept>

#include "moetrain/checkpoint_session.hpp"

namespace fs = std::filesystem;

namespace moetrain::cli {

Config checkpoint_config(const std::string& dir, const std::vector<std::string>& sets) {
  if (!fs::is_directory(dir))
    throw std::runtime_error("--checkpoint '" + dir + "': not a directory");
  return CheckpointReader(dir).config(sets);
}

const CLI::Validator& finite_non_negative() {
  static const CLI::Validator v(
      [](std::string& s) -> std::string {
        double x = 0;
        const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), x);
        if (ec != std::errc{} || end != s.data() + s.size() || !std::isfinite(x) || x < 0)
          return "expected a finite number >= 0, got '" + s + "'";
        return {};
      },
      "FINITE >= 0");
  return v;
}

const CLI::Validator& decimal_uint64() {
  static const CLI::Validator v(
      [](std::string& s) -> std::string {
        std::uint64_t x = 0;
        const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), x);
        if (ec != std::errc{} || end != s.data() + s.size())
          return "expected a decimal integer in [0, 18446744073709551615], got '" + s + "'";
        return {};
      },
      "UINT64");
  return v;
}

std::unique_ptr<Model<float>> load_checkpoint_model(const std::string& dir, const Config& cfg,
                                                    Backend<float>& backend, int batch) {
  auto model = std::make_unique<Model<float>>(cfg.model, backend, batch);
  CheckpointReader(dir).load_model(*model);
  return model;
}

}  // namespace moetrain::cli
