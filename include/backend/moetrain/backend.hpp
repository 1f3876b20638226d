// The Backend interface: owns device memory and executes ops.
//
// The model, optimizers and trainer call only this interface, so the same training step runs on
// the CPU (CpuBackend, fp32 or double) or the GPU (CudaBackend). All pointers passed to ops are
// device pointers of this backend.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <utility>

#include "moetrain/backend_ops.hpp"

namespace moetrain {

// The ops, their shapes and their contracts are listed in backend_ops.hpp.
template <typename T>
class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;

  MOETRAIN_BACKEND_MEMORY(MOETRAIN_OP_PURE, T)
  MOETRAIN_BACKEND_OPS(MOETRAIN_OP_PURE, T)
  MOETRAIN_BACKEND_QUERIES(MOETRAIN_QUERY_PURE, T)

  // Device work that repeats. `work` only enqueues ops — no upload, download, allocation or free —
  // and enqueues the same ops with the same arguments every time it is called with this key (the
  // data it reads may change: they sit in device buffers). A backend may record it once and replay
  // the recording on later calls instead of calling `work` (CudaBackend: a CUDA graph). The
  // default calls `work` every time.
  struct RepeatKey {
    const void* owner;  // e.g. the model, whose buffers the work uses
    std::uint64_t id;   // which of the owner's repeated works
    bool operator==(const RepeatKey&) const = default;
  };
  virtual void run_repeated(const RepeatKey& key, const std::function<void()>& work) {
    (void)key;
    work();
  }

  // The stream the ops are enqueued on (a cudaStream_t), which a communicator's own stream orders
  // with (Communicator::order_with); null where ops run on the calling thread (the CPU).
  virtual void* native_stream() const { return nullptr; }
};

// An owning device allocation of `count` elements of U (zero-filled; none, and a null pointer,
// for a count of 0).
template <typename T, typename U>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Backend<T>& be, std::size_t count)
      : be_(&be),
        count_(count),
        ptr_(count ? static_cast<U*>(be.alloc_bytes(count * sizeof(U))) : nullptr) {}
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    release();
    be_ = o.be_;
    count_ = o.count_;
    ptr_ = o.ptr_;
    o.ptr_ = nullptr;
    o.count_ = 0;
    return *this;
  }
  ~DeviceBuffer() { release(); }

  U* get() const { return ptr_; }
  std::size_t size() const { return count_; }

 private:
  void release() {
    if (ptr_) be_->free_bytes(ptr_);
    ptr_ = nullptr;
  }
  Backend<T>* be_ = nullptr;
  std::size_t count_ = 0;
  U* ptr_ = nullptr;
};

}  // namespace moetrain
