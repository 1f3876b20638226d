// The Communicator: collectives over the ranks of a data-parallel job. LocalComm is the world of
// one process (every collective is a copy or nothing); MpiComm (CPU buffers) and NcclComm (GPU
// buffers) implement the same interface across processes. make_runtime (runtime.hpp) picks the
// communicator together with the backend, so the two agree on where buffers live.
//
// Two kinds of arguments:
//   - data: the `void*` / `V*` buffers of all_reduce, reduce_scatter, all_gather and broadcast are
//     DEVICE buffers of the run's backend (host memory on the CPU backend, GPU memory on CUDA);
//   - host scalars: reduce_host takes HOST arrays (losses, S_max, expert loads, optimizer
//     statistics), all reduced in one collective, so a step batches them into one call.
//
// Started collectives (ZeRO-1's gradient buckets, docs/design.md §5.2): reduce_scatter_start
// returns at once; the collectives started run in start order, each after the backend work
// enqueued before its start, and are complete for the backend work enqueued after
// finish_started(). Neither buffer may be touched in between. On a GPU (NcclComm) they run on the
// communicator's stream, ordered with the backend's stream (given by order_with) by events, so the
// host never waits for them; on MPI they are non-blocking collectives that progress() advances
// (MPI moves their data only inside its calls) and finish_started() waits for. The default runs
// each at once.
//
// bytes_moved() counts what this rank sends under the ring algorithms (the bandwidth cost model
// of NCCL and of large-message MPI): all-reduce 2(N-1)/N of the buffer, reduce-scatter and
// all-gather (N-1)/N of the full buffer, broadcast the buffer at the root.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "moetrain/backend.hpp"

namespace moetrain {

enum class ReduceOp { Sum, Max };
enum class DType { F32, F64, I32, I64 };

template <typename V>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() {
  return DType::F32;
}
template <>
constexpr DType dtype_of<double>() {
  return DType::F64;
}
template <>
constexpr DType dtype_of<std::int32_t>() {
  return DType::I32;
}
template <>
constexpr DType dtype_of<std::int64_t>() {
  return DType::I64;
}

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world() const = 0;
  virtual const char* name() const = 0;

  // In place over `count` elements.
  virtual void all_reduce(void* data, std::size_t count, DType type, ReduceOp op) = 0;
  // send holds world() * count elements; rank r receives the reduction of block r in recv.
  virtual void reduce_scatter(const void* send, void* recv, std::size_t count, DType type,
                              ReduceOp op) = 0;
  // recv (world() * count elements) receives every rank's `count` elements, in rank order.
  virtual void all_gather(const void* send, void* recv, std::size_t count, DType type) = 0;
  virtual void broadcast(void* data, std::size_t bytes, int root) = 0;
  virtual void barrier() = 0;
  virtual void reduce_scatter_start(const void* send, void* recv, std::size_t count, DType type,
                                    ReduceOp op) {
    reduce_scatter(send, recv, count, type, op);
  }
  virtual void progress() {}
  virtual void finish_started() {}
  // The backend's stream (a cudaStream_t; null on the CPU), which started collectives order with.
  virtual void order_with(void* stream) { (void)stream; }
  // Host arrays: sums[i] becomes the sum over ranks, maxes[i] the maximum, in one collective.
  // Every rank gets the same bits (the sums are taken in rank order on each rank).
  virtual void reduce_host(double* sums, std::size_t n_sums, double* maxes,
                           std::size_t n_maxes) = 0;

  // Ends the whole job at once with exit status `code`, peers included (a rank's fatal error must
  // not leave the others waiting in a collective). A world of one just exits.
  [[noreturn]] virtual void abort_job(int code) noexcept { std::_Exit(code); }

  std::uint64_t bytes_moved() const { return bytes_moved_; }
  // Seconds the calling thread spent inside this communicator's calls: on the CPU, where every
  // call waits for its data, the communication the step exposes.
  double blocked_seconds() const { return blocked_s_; }

  template <typename V>
  void all_reduce(V* data, std::size_t count, ReduceOp op) {
    all_reduce(static_cast<void*>(data), count, dtype_of<V>(), op);
  }
  template <typename V>
  void reduce_scatter(const V* send, V* recv, std::size_t count, ReduceOp op) {
    reduce_scatter(static_cast<const void*>(send), static_cast<void*>(recv), count, dtype_of<V>(),
                   op);
  }
  template <typename V>
  void all_gather(const V* send, V* recv, std::size_t count) {
    all_gather(static_cast<const void*>(send), static_cast<void*>(recv), count, dtype_of<V>());
  }
  template <typename V>
  void reduce_scatter_start(const V* send, V* recv, std::size_t count, ReduceOp op) {
    reduce_scatter_start(static_cast<const void*>(send), static_cast<void*>(recv), count,
                         dtype_of<V>(), op);
  }

 protected:
  static std::size_t type_size(DType t) { return (t == DType::F64 || t == DType::I64) ? 8 : 4; }
  // reduce_host from every rank's [sums..., maxes...] gathered in rank order.
  static void reduce_gathered(const std::vector<double>& gathered, int world, double* sums,
                              std::size_t n_sums, double* maxes, std::size_t n_maxes);
  // Adds the lifetime of the timer to blocked_seconds().
  class BlockedTimer {
   public:
    explicit BlockedTimer(Communicator& c) : c_(c), t0_(std::chrono::steady_clock::now()) {}
    ~BlockedTimer() {
      c_.blocked_s_ +=
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
    }
    BlockedTimer(const BlockedTimer&) = delete;
    BlockedTimer& operator=(const BlockedTimer&) = delete;

   private:
    Communicator& c_;
    std::chrono::steady_clock::time_point t0_;
  };
  std::uint64_t bytes_moved_ = 0;
  double blocked_s_ = 0;
};

class LocalComm final : public Communicator {
 public:
  // The one copy a world of one does (reduce-scatter and all-gather into another buffer): the
  // backend's own copy, so it runs in order with the backend's work (on its stream on a GPU).
  using CopyFn = std::function<void(void* dst, const void* src, std::size_t bytes)>;
  explicit LocalComm(CopyFn copy) : copy_(std::move(copy)) {}
  int rank() const override { return 0; }
  int world() const override { return 1; }
  const char* name() const override { return "local"; }
  void all_reduce(void*, std::size_t, DType, ReduceOp) override {}
  void reduce_scatter(const void* send, void* recv, std::size_t count, DType type,
                      ReduceOp) override {
    if (send != recv) copy_(recv, send, count * type_size(type));
  }
  void all_gather(const void* send, void* recv, std::size_t count, DType type) override {
    if (send != recv) copy_(recv, send, count * type_size(type));
  }
  void broadcast(void*, std::size_t, int) override {}
  void barrier() override {}
  void reduce_host(double*, std::size_t, double*, std::size_t) override {}

 private:
  CopyFn copy_;
};

// A world of one over `backend`'s buffers.
template <typename T>
std::unique_ptr<LocalComm> make_local_comm(Backend<T>& backend) {
  return std::make_unique<LocalComm>(
      [&backend](void* dst, const void* src, std::size_t bytes) { backend.copy(dst, src, bytes); });
}

// Whether this process was started by mpirun or srun (their environment says so).
bool launched_by_mpi();

}  // namespace moetrain
