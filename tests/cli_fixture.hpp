// Helpers for tests that run the built `moetrain` binary as a user would: a small corpus
// prepared once per test process, and command execution.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moetrain/rng.hpp"
#include "test_util.hpp"

namespace moetrain::test {

namespace fs = std::filesystem;

struct CommandResult {
  int exit_code;
  std::string output;  // stdout and stderr
};

inline CommandResult run_command(const std::string& cmd) {
  CommandResult r{-1, ""};
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return r;
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) r.output.append(buf, n);
  const int status = ::pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

inline std::string binary() {
  return MOETRAIN_BINARY;
}
inline std::string source_dir() {
  return MOETRAIN_SOURCE_DIR;
}

inline std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

inline std::vector<nlohmann::json> read_jsonl(const fs::path& p) {
  std::vector<nlohmann::json> out;
  std::ifstream f(p);
  std::string line;
  while (std::getline(f, line))
    if (!line.empty()) out.push_back(nlohmann::json::parse(line));
  return out;
}

// Pseudo-text documents (syllable words with a skewed frequency), tokenized once per process by
// `moetrain prepare-data` with a 512-token vocabulary. Returns the data directory.
inline const std::string& prepared_corpus() {
  static const TempDir tmp("corpus");  // removed at process exit
  static const std::string dir = [] {
    const fs::path& root = tmp.path;
    fs::create_directories(root / "text");
    // Words of one to three syllables, drawn with a skewed (Zipf-like) frequency.
    Rng rng(2024);
    const char* cons = "bcdfghklmnprstvw";
    const char* vows = "aeiou";
    std::vector<std::string> words;
    for (int i = 0; i < 700; ++i) {
      std::string w;
      const int syl = 1 + int(rng.below(3));
      for (int k = 0; k < syl; ++k) {
        w += cons[rng.below(16)];
        w += vows[rng.below(5)];
        if (rng.below(3) == 0) w += cons[rng.below(16)];
      }
      words.push_back(w);
    }
    for (int d = 0; d < 60; ++d) {
      std::ofstream f(root / "text" / ("doc" + std::to_string(100 + d) + ".txt"));
      for (int s = 0; s < 40; ++s) {
        const int len = 5 + int(rng.below(10));
        for (int w = 0; w < len; ++w) {
          const double u = rng.uniform();
          std::string word = words[std::size_t(u * u * u * double(words.size()))];
          if (w == 0) word[0] = char(word[0] - 'a' + 'A');
          f << word << (w + 1 < len ? " " : ".\n");
        }
      }
    }
    const auto r =
        run_command(binary() + " prepare-data --input " + (root / "text").string() + " --out " +
                    (root / "data").string() + " --vocab-size 512 --val-fraction 0.1");
    if (r.exit_code != 0) throw std::runtime_error("prepare-data failed: " + r.output);
    return (root / "data").string();
  }();
  return dir;
}

// `--set` flags pointing configs/ci.json at the prepared corpus and an output directory. MFU is
// against a given peak (train.peak_gflops): measuring it costs a 2048^3 GEMM per process, 0.3 s
// on the CPU and 2 s in the GPU simulator, for each of the hundreds of runs the tests start
// ("train: MFU is against ..." runs the measurement).
inline std::string ci_args(const std::string& out_dir) {
  const std::string d = prepared_corpus();
  return " --config " + source_dir() + "/configs/ci.json --set 'data.train_pattern=" + d +
         "/train_*.bin' --set 'data.val_pattern=" + d + "/val_*.bin' --set 'data.tokenizer=" + d +
         "/tokenizer.json' --set 'train.out_dir=" + out_dir + "' --set train.peak_gflops=100";
}

}  // namespace moetrain::test
