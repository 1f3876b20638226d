#include "moetrain/signals.hpp"

#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstring>

namespace moetrain {

namespace {
std::atomic<bool> g_stop_requested{false};
std::atomic<bool> g_graceful{false};

extern "C" void on_stop_signal(int sig) {
  if (g_graceful.load()) {
    g_stop_requested.store(true);
    return;
  }
  // Start-up: nothing to save yet, so leave at once (async-signal-safe calls only).
  const char* msg = sig == SIGINT ? "moetrain: SIGINT during start-up: nothing to save; exiting\n"
                                  : "moetrain: SIGTERM during start-up: nothing to save; exiting\n";
  const ssize_t n = ::write(STDERR_FILENO, msg, std::strlen(msg));
  (void)n;
  ::_exit(128 + sig);
}
}  // namespace

void install_stop_signal_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

void stop_signals_save_from_now() {
  g_graceful.store(true);
}

bool stop_requested() {
  return g_stop_requested.load();
}

}  // namespace moetrain
