// A planned arena: buffers are requested by size first, then carved out of one allocation, so
// activations live in one place whose size is known before the first step.
#pragma once

#include <cstddef>
#include <vector>

#include "moetrain/backend.hpp"

namespace moetrain {

class ArenaPlan {
 public:
  template <typename U>
  void request(U*& slot, std::size_t count) {
    slots_.push_back({reinterpret_cast<void**>(&slot), count * sizeof(U)});
  }
  // Allocates one block (each buffer 64-byte aligned), points every requested slot into it and
  // returns the block. The caller frees it with free_bytes.
  template <typename T>
  void* commit(Backend<T>& be) {
    std::size_t total = 0;
    for (auto& s : slots_) total += align(s.bytes);
    auto* base = static_cast<char*>(be.alloc_bytes(total));
    std::size_t off = 0;
    for (auto& s : slots_) {
      *s.slot = base + off;
      off += align(s.bytes);
    }
    bytes_ = total;
    slots_.clear();
    return base;
  }
  std::size_t bytes() const { return bytes_; }

 private:
  static std::size_t align(std::size_t b) { return (b + 63) / 64 * 64; }
  struct Slot {
    void** slot;
    std::size_t bytes;
  };
  std::vector<Slot> slots_;
  std::size_t bytes_ = 0;
};

}  // namespace moetrain
