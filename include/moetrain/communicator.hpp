// The Communicator: collectives over the ranks of a data-parallel job. LocalComm is the world of
// one process (every collective is the identity); MpiComm and NcclComm implement the same
// interface across processes. Buffers are device buffers of the backend in use.
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
  virtual void broadcast(void* data, std::size_t bytes, int root) = 0;
  virtual void barrier() = 0;

  template <typename V>
  void all_reduce(V* data, std::size_t count, ReduceOp op) {
    all_reduce(static_cast<void*>(data), count, dtype_of<V>(), op);
  }
};

class LocalComm final : public Communicator {
 public:
  int rank() const override { return 0; }
  int world() const override { return 1; }
  const char* name() const override { return "local"; }
  void all_reduce(void*, std::size_t, DType, ReduceOp) override {}
  void broadcast(void*, std::size_t, int) override {}
  void barrier() override {}
};

}  // namespace moetrain
