// ProfilingBackend: wraps another backend and accounts time (and FLOPs) per op and per phase, for
// `moetrain bench --profile`. Memory calls pass through untimed; repeated regions run their ops
// one by one through the profiler (no graphs), so each op is seen.
//
// How an op is timed:
//   * with DeviceMarkers (the CUDA backend): a marker (a CUDA event) before and after each op on
//     the backend's stream, nothing waited for; collect() — after the caller has synchronised —
//     turns the marker pairs into device seconds;
//   * otherwise wall time, with `sync` (when given) called at the end of every op before the clock
//     is read, so on an asynchronous backend each op's time is its device time plus one
//     synchronisation.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "moetrain/backend.hpp"

namespace moetrain {

struct OpProfile {
  double seconds = 0;
  double flops = 0;
  long calls = 0;
};

// What an asynchronous backend can tell about its own work (CudaBackend): markers — timestamps on
// its stream, in order with its work (CUDA events) — and how often the host launched work (kernel
// launches, library calls, graph launches: each a host-side cost) and waited for the device.
class DeviceMarkers {
 public:
  virtual ~DeviceMarkers() = default;
  virtual int mark() = 0;                        // records a marker now; returns its id
  virtual double seconds(int from, int to) = 0;  // between two markers, once both have run
  virtual void clear_markers() = 0;              // ids restart from 0
  virtual std::uint64_t host_launches() const = 0;
  virtual std::uint64_t host_syncs() const = 0;
};

// The phase of a step an op belongs to (bench's breakdown): "attention", "experts" (the grouped
// expert GEMMs), "other GEMMs", or "elementwise" (norms, activations, embedding, cross-entropy,
// routing and permutation, reductions). The optimizer's ops are labelled by the caller
// (ProfilingBackend::set_phase).
inline const char* op_phase(const std::string& op) {
  if (op.rfind("attention", 0) == 0 || op.rfind("rope", 0) == 0) return "attention";
  if (op.rfind("grouped_gemm", 0) == 0) return "experts";
  if (op == "gemm" || op == "gemm_batched" || op == "symmetric_gemm_batched") return "other GEMMs";
  return "elementwise";
}

template <typename T>
class ProfilingBackend final : public Backend<T> {
 public:
  explicit ProfilingBackend(Backend<T>& inner, std::function<void()> sync = {},
                            DeviceMarkers* markers = nullptr)
      : inner_(inner), sync_(std::move(sync)), markers_(markers) {}

  // Per op and per phase; with markers, as of the last collect().
  const std::map<std::string, OpProfile>& profile() const { return profile_; }
  const std::map<std::string, OpProfile>& phases() const { return phases_; }
  void reset() {
    collect();
    profile_.clear();
    phases_.clear();
  }
  // Labels the ops from now on with `phase` (empty: by op_phase).
  void set_phase(std::string phase) { phase_ = std::move(phase); }
  // With markers: adds the device time of every op timed since the last collect(). The caller
  // must have synchronised the backend's stream first.
  void collect() {
    if (!markers_) return;
    for (const Pending& p : pending_)
      account(p.op, p.phase, markers_->seconds(p.from, p.to), p.flops);
    pending_.clear();
    markers_->clear_markers();
  }

  const char* name() const override { return inner_.name(); }
  void* native_stream() const override { return inner_.native_stream(); }

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
  void account(const std::string& op, const std::string& phase, double seconds, double flops) {
    for (OpProfile* p : {&profile_[op], &phases_[phase]}) {
      p->seconds += seconds;
      p->flops += flops;
      ++p->calls;
    }
  }
  struct Pending {
    std::string op, phase;
    double flops;
    int from, to;
  };
  struct Timer {
    Timer(ProfilingBackend& pb, const char* op, double flops)
        : pb_(pb), op_(op), flops_(flops), t0_(std::chrono::steady_clock::now()) {
      if (pb_.markers_) from_ = pb_.markers_->mark();
    }
    ~Timer() {
      const std::string phase = pb_.phase_.empty() ? op_phase(op_) : pb_.phase_;
      if (pb_.markers_) {
        pb_.pending_.push_back({op_, phase, flops_, from_, pb_.markers_->mark()});
        return;
      }
      if (pb_.sync_) pb_.sync_();
      pb_.account(op_, phase,
                  std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count(),
                  flops_);
    }
    ProfilingBackend& pb_;
    const char* op_;
    double flops_;
    std::chrono::steady_clock::time_point t0_;
    int from_ = -1;
  };

  Backend<T>& inner_;
  std::function<void()> sync_;
  DeviceMarkers* markers_;
  std::string phase_;
  std::vector<Pending> pending_;
  std::map<std::string, OpProfile> profile_, phases_;
};

}  // namespace moetrain
