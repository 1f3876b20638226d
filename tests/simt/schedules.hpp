// tests/simt/schedules.hpp — the one seam between the kernel tests and where they run. The same
// tests/simt/test_*.cpp build twice (docs/design.md §6.4):
//   * SIMT build (MOETRAIN_SIMT): Schedule and ScopedSchedule are the simulator's; a test loops
//     over the schedules it names and runs every launch under each.
//   * GPU build (nvcc, moetrain_gpu_tests): the hardware schedules threads. Schedule is one value
//     named "device", ScopedSchedule does nothing, and schedules(...) of any list is that one
//     schedule, so each case runs once.
// Tests name schedules only through this header (never simt:: directly); everything else they use
// (cudaMalloc, cudaMemset poisoning, launchers) is the CUDA runtime API on both sides.
#pragma once

#include <string>
#include <vector>

#include "common.cuh"

namespace kernel_test {

#if defined(MOETRAIN_SIMT)

using Schedule = simt::Schedule;
using ScopedSchedule = simt::ScopedSchedule;

inline std::vector<Schedule> schedules(std::vector<Schedule> list) {
  return list;
}
// forward, reverse, random(1), random(2)
inline std::vector<Schedule> test_schedules() {
  return simt::standard_schedules();
}

#else

class Schedule {
 public:
  static Schedule forward() { return {}; }
  static Schedule reverse() { return {}; }
  static Schedule random(unsigned long long /*seed*/) { return {}; }
  std::string name() const { return "device"; }
};

class ScopedSchedule {
 public:
  explicit ScopedSchedule(const Schedule& /*s*/) {}
  ScopedSchedule(const ScopedSchedule&) = delete;
  ScopedSchedule& operator=(const ScopedSchedule&) = delete;
};

inline std::vector<Schedule> schedules(const std::vector<Schedule>& /*list*/) {
  return {Schedule{}};
}
inline std::vector<Schedule> test_schedules() {
  return {Schedule{}};
}

#endif

}  // namespace kernel_test
