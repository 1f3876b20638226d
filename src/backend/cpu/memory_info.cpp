// The host memory this process can still allocate: MemAvailable, bounded by a cgroup v2 limit.
#include <fstream>
#include <limits>
#include <sstream>
#include <string>

#include "backend/cpu/ops.hpp"

namespace moetrain::cpu {

namespace {

constexpr std::size_t kUnknown = std::numeric_limits<std::size_t>::max();

// The first number in a file, or kUnknown (missing file, or "max").
std::size_t read_number(const std::string& path) {
  std::ifstream in(path);
  unsigned long long v = 0;
  if (!(in >> v)) return kUnknown;
  return std::size_t(v);
}

// The cgroup v2 directory of this process ("0::/path" in /proc/self/cgroup).
std::string cgroup_dir() {
  std::ifstream in("/proc/self/cgroup");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("0::", 0) == 0) return "/sys/fs/cgroup" + line.substr(3);
  return "/sys/fs/cgroup";
}

}  // namespace

std::size_t available_host_memory() {
  std::size_t avail = kUnknown;
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  unsigned long long kb = 0;
  std::string unit;
  while (meminfo >> key >> kb) {
    std::getline(meminfo, unit);
    if (key == "MemAvailable:") {
      avail = std::size_t(kb) * 1024;
      break;
    }
  }
  for (const std::string& dir : {cgroup_dir(), std::string("/sys/fs/cgroup")}) {
    const std::size_t max = read_number(dir + "/memory.max");
    if (max == kUnknown) continue;
    const std::size_t current = read_number(dir + "/memory.current");
    const std::size_t headroom = current == kUnknown ? max : (max > current ? max - current : 0);
    if (headroom < avail) avail = headroom;
    break;
  }
  return avail;
}

}  // namespace moetrain::cpu
