// ProfilingBackend: wraps another backend and accounts wall time (and GEMM FLOPs) per op, for
// `moetrain bench --profile`. Memory calls pass through untimed. On an asynchronous backend the
// times are launch times unless a `sync` is given: it is called at the end of every op, before the
// clock is read, so each op's time is its device time plus one synchronisation.
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <string>
#include <utility>

#include "moetrain/backend.hpp"

namespace moetrain {

struct OpProfile {
  double seconds = 0;
  double flops = 0;
  long calls = 0;
};

template <typename T>
class ProfilingBackend final : public Backend<T> {
 public:
  explicit ProfilingBackend(Backend<T>& inner, std::function<void()> sync = {})
      : inner_(inner), sync_(std::move(sync)) {}

  const std::map<std::string, OpProfile>& profile() const { return profile_; }
  void reset() { profile_.clear(); }

  const char* name() const override { return inner_.name(); }

#define MOETRAIN_PROFILE_PASS(ret, name, params, args, flops) \
  ret name params override {                                  \
    return inner_.name args;                                  \
  }
#define MOETRAIN_PROFILE_OP(ret, name, params, args, flops) \
  ret name params override {                                \
    Timer timer(*this, #name, flops);                       \
    return inner_.name args;                                \
  }
#define MOETRAIN_PROFILE_QUERY(ret, name, params, args, flops) \
  ret name params const override {                             \
    return inner_.name args;                                   \
  }
  MOETRAIN_BACKEND_MEMORY(MOETRAIN_PROFILE_PASS, T)
  MOETRAIN_BACKEND_OPS(MOETRAIN_PROFILE_OP, T)
  MOETRAIN_BACKEND_QUERIES(MOETRAIN_PROFILE_QUERY, T)
#undef MOETRAIN_PROFILE_PASS
#undef MOETRAIN_PROFILE_OP
#undef MOETRAIN_PROFILE_QUERY

 private:
  struct Timer {
    Timer(ProfilingBackend& pb, const char* op, double flops)
        : pb_(pb), op_(op), flops_(flops), t0_(std::chrono::steady_clock::now()) {}
    ~Timer() {
      if (pb_.sync_) pb_.sync_();
      OpProfile& p = pb_.profile_[op_];
      p.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
      p.flops += flops_;
      ++p.calls;
    }
    ProfilingBackend& pb_;
    const char* op_;
    double flops_;
    std::chrono::steady_clock::time_point t0_;
  };

  Backend<T>& inner_;
  std::function<void()> sync_;
  std::map<std::string, OpProfile> profile_;
};

}  // namespace moetrain
