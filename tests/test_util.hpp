// Helpers shared by the tests (tests/ and tests/simt/): a scratch directory.
#pragma once

#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>

namespace moetrain::test {

// A fresh, empty directory under the system temp dir, unique to this process and this object
// (moetrain_test_<name>_<pid>_<n>), removed with its contents at scope exit.
struct TempDir {
  const std::filesystem::path path;

  explicit TempDir(const std::string& name) : path(unique_path(name)) {
    std::filesystem::remove_all(path);  // left over by an earlier process with the same pid
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  std::string str() const { return path.string(); }
  // The path of `name` in the directory.
  std::string file(const std::string& name) const { return (path / name).string(); }
  // Writes `text` to the file `name` in the directory; returns its path.
  std::string write(const std::string& name, const std::string& text) const {
    const std::string p = file(name);
    std::ofstream(p, std::ios::binary) << text;
    return p;
  }

 private:
  static std::filesystem::path unique_path(const std::string& name) {
    static std::atomic<int> counter{0};
    return std::filesystem::temp_directory_path() /
           ("moetrain_test_" + name + "_" + std::to_string(::getpid()) + "_" +
            std::to_string(counter++));
  }
};

}  // namespace moetrain::test
