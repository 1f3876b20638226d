#include "moetrain/fault_point.hpp"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>

namespace moetrain {

namespace {
long kill_at() {
  static const long n = [] {
    const char* v = std::getenv("MOETRAIN_KILL_AT_FILE_OP");
    return v ? std::strtol(v, nullptr, 10) : 0L;
  }();
  return n;
}
bool trace() {
  static const bool on = std::getenv("MOETRAIN_TRACE_FILE_OPS") != nullptr;
  return on;
}
std::atomic<long> g_ops{0};
}  // namespace

void file_fault_point(const char* what) {
  const long n = ++g_ops;
  if (trace()) std::fprintf(stderr, "file operation %ld: %s\n", n, what);
  if (kill_at() <= 0 || n != kill_at()) return;
  std::fprintf(stderr, "MOETRAIN_KILL_AT_FILE_OP=%ld: killed before %s\n", n, what);
  std::fflush(stderr);
  ::kill(::getpid(), SIGKILL);
}

}  // namespace moetrain
