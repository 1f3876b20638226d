// The Communicator: collectives over the ranks of a data-parallel job. LocalComm is the world of
// one process (every collective is a copy or nothing); MpiComm (CPU buffers) and NcclComm (GPU
// buffers) implement the same interface across processes. Buffers are device buffers of the
// backend in use.
//
// bytes_moved() counts what this rank sends under the ring algorithms (the bandwidth cost model
// of NCCL and of large-message MPI): all-reduce 2(N-1)/N of the buffer, reduce-scatter and
// all-gather (N-1)/N of the full buffer, broadcast the buffer at the root.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

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
  // Ends every rank of the job now (after a fatal error on this one).
  [[noreturn]] virtual void abort(int code) = 0;

  std::uint64_t bytes_moved() const { return bytes_moved_; }

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

 protected:
  static std::size_t type_size(DType t) { return (t == DType::F64 || t == DType::I64) ? 8 : 4; }
  std::uint64_t bytes_moved_ = 0;
};

class LocalComm final : public Communicator {
 public:
  // The one copy a world of one does (reduce-scatter and all-gather): host memmove by default; a
  // GPU backend's world of one passes a device copy.
  using CopyFn = void (*)(const void* src, void* dst, std::size_t bytes);
  explicit LocalComm(CopyFn copy = host_copy) : copy_(copy) {}
  int rank() const override { return 0; }
  int world() const override { return 1; }
  const char* name() const override { return "local"; }
  void all_reduce(void*, std::size_t, DType, ReduceOp) override {}
  void reduce_scatter(const void* send, void* recv, std::size_t count, DType type,
                      ReduceOp) override {
    if (send != recv) copy_(send, recv, count * type_size(type));
  }
  void all_gather(const void* send, void* recv, std::size_t count, DType type) override {
    if (send != recv) copy_(send, recv, count * type_size(type));
  }
  void broadcast(void*, std::size_t, int) override {}
  void barrier() override {}
  [[noreturn]] void abort(int code) override;

 private:
  static void host_copy(const void* src, void* dst, std::size_t bytes);
  CopyFn copy_;
};

// The communicator of this process: MpiComm when launched by mpirun or srun (their environment
// says so), else LocalComm.
std::unique_ptr<Communicator> make_communicator();

}  // namespace moetrain
