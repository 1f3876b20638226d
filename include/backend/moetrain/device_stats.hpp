// DeviceStats: the small device values of a training step — the loss sums, S_max, router
// statistics and expert loads the model writes, the gradient norm, verdict and update sums the
// optimizer writes — in one allocation, so the host reads a whole step with one download: the one
// synchronisation of a step on an asynchronous backend (docs/design.md §2.3, §7.1).
//
// Each user reserves its typed regions before allocate() (the trainer shares one DeviceStats
// between its model and optimizer; either makes its own when used alone) and resolves them with
// device() at use; after download(), host() reads a region as the last download found it.
#pragma once

#include <cstddef>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "moetrain/backend.hpp"

namespace moetrain {

template <typename T>
class DeviceStats {
 public:
  // A typed region: `count` elements of U at byte `offset` of the block.
  template <typename U>
  struct Region {
    std::size_t offset = 0, count = 0;
  };

  explicit DeviceStats(Backend<T>& be) : be_(&be) {}
  // Without a backend: only reserves, to size a block (the memory estimate).
  DeviceStats() = default;
  DeviceStats(const DeviceStats&) = delete;
  DeviceStats& operator=(const DeviceStats&) = delete;
  ~DeviceStats() {
    if (block_) be_->free_bytes(block_);
  }

  template <typename U>
  Region<U> reserve(std::size_t count) {
    if (allocated_) throw std::logic_error("DeviceStats::reserve after allocate()");
    const std::size_t offset = (bytes_ + kAlign - 1) / kAlign * kAlign;
    bytes_ = offset + count * sizeof(U);
    return {offset, count};
  }
  // Allocates the block (zero-filled) once every region is reserved; a second call does nothing.
  void allocate() {
    if (allocated_) return;
    if (!be_) throw std::logic_error("DeviceStats::allocate without a backend");
    allocated_ = true;
    if (bytes_) block_ = static_cast<unsigned char*>(be_->alloc_bytes(bytes_));
    host_.assign(bytes_, 0);
  }
  bool allocated() const { return allocated_; }
  std::size_t bytes() const { return bytes_; }

  template <typename U>
  U* device(Region<U> r) const {
    if (!allocated_) throw std::logic_error("DeviceStats::device before allocate()");
    return r.count ? reinterpret_cast<U*>(block_ + r.offset) : nullptr;
  }
  // The whole block to the host, in one download.
  void download() {
    if (!allocated_) throw std::logic_error("DeviceStats::download before allocate()");
    be_->download(host_.data(), block_, bytes_);
  }
  // A region as the last download() found it.
  template <typename U>
  std::vector<U> host(Region<U> r) const {
    std::vector<U> out(r.count);
    if (r.count) std::memcpy(out.data(), host_.data() + r.offset, r.count * sizeof(U));
    return out;
  }

 private:
  static constexpr std::size_t kAlign = 16;
  Backend<T>* be_ = nullptr;
  std::size_t bytes_ = 0;
  bool allocated_ = false;
  unsigned char* block_ = nullptr;
  std::vector<unsigned char> host_;
};

}  // namespace moetrain
