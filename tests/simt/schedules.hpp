// tests/simt/schedules.hpp — the one seam between the kernel tests and where they run. The same
// tests/simt/test_*.cpp build twice (docs/design.md §6.4):
//   * SIMT build (MOETRAIN_SIMT): Schedule and ScopedSchedule are the simulator's; a test loops
//     over the schedules it names and runs every launch under each.
//   * GPU build (nvcc, moetrain_gpu_tests): the hardware schedules threads. Schedule is one value
//     named "device", ScopedSchedule does nothing, and schedules(...) of any list is that one
//     schedule, so each case runs once.
// Tests name schedules only through this header (never simt:: directly) — the thread schedules
// and, for host code that uses streams, EACH_STREAM_SCHEDULE() (eager and deferred in the
// simulator, the device's own order on a GPU); everything else they use (cudaMalloc, cudaMemset
// poisoning, launchers) is the CUDA runtime API on both sides.
#pragma once

#include <catch2/catch.hpp>

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

// Runs the rest of the test case once under each stream schedule (eager, deferred), named in the
// messages: for tests of host code that uses streams.
#define EACH_STREAM_SCHEDULE()                                                   \
  const ::simt::StreamSchedule each_stream_schedule_ =                           \
      GENERATE(::simt::StreamSchedule::Eager, ::simt::StreamSchedule::Deferred); \
  INFO("stream schedule " << ::simt::name(each_stream_schedule_));               \
  ::simt::ScopedStreamSchedule each_stream_schedule_scope_(each_stream_schedule_)

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

// The device orders its streams itself: one run.
#define EACH_STREAM_SCHEDULE() INFO("stream schedule: device")

#endif

}  // namespace kernel_test
