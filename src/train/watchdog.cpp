#include "train/watchdog.hpp"

#include <cstdio>
#include <cstdlib>

namespace moetrain {

Watchdog::Watchdog(int seconds, int rank) : seconds_(seconds), rank_(rank) {
  if (seconds_ <= 0) return;
  beat();
  thread_ = std::thread([this] { watch(); });
}

Watchdog::~Watchdog() {
  done_.store(true);
  if (thread_.joinable()) thread_.join();
}

void Watchdog::beat() {
  last_.store(Clock::now().time_since_epoch().count());
}

void Watchdog::watch() {
  while (!done_.load()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    const auto last = Clock::time_point(Clock::duration(last_.load()));
    const double idle = std::chrono::duration<double>(Clock::now() - last).count();
    if (idle > seconds_) {
      std::fprintf(stderr,
                   "error: rank %d: no progress for %.0f s (train.watchdog_seconds = %d): a peer "
                   "rank has probably died or hung; exiting\n",
                   rank_, idle, seconds_);
      std::fflush(stderr);
      std::_Exit(3);
    }
  }
}

}  // namespace moetrain
