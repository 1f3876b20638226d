// Ends the process when the training loop stops making progress: a collective waiting forever on
// a rank that died or hung. mpirun then takes the rest of the job down.
#pragma once

#include <atomic>
#include <chrono>
#include <thread>

namespace moetrain {

class Watchdog {
 public:
  // `seconds` <= 0: no watchdog (no thread). Otherwise the process exits (std::_Exit(3), with a
  // message naming `rank`) once beat() has not been called for `seconds`.
  Watchdog(int seconds, int rank);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;
  void beat();

 private:
  using Clock = std::chrono::steady_clock;
  void watch();
  int seconds_, rank_;
  std::atomic<Clock::rep> last_{0};
  std::atomic<bool> done_{false};
  std::thread thread_;
};

}  // namespace moetrain
