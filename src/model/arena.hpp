// A planned arena: buffers are requested by size first, then carved out of one allocation, so
// activations live in one place whose size is known before the first step.
//
// A dry plan only adds the sizes up (nothing is bound, nothing allocated): the memory estimate
// runs the model's own requests on one, with one layer of each kind standing for all the layers
// of that kind (set_repeat), so the estimate and the model's arena cannot drift apart. Sizes are
// 64-bit with overflow checks (SizeOverflow).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <vector>

#include "moetrain/backend.hpp"

namespace moetrain {

// A size that does not fit in 64 bits.
struct SizeOverflow : std::overflow_error {
  using std::overflow_error::overflow_error;
};

inline std::size_t checked_mul(std::size_t a, std::size_t b) {
  std::size_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) throw SizeOverflow("size overflows 64 bits");
  return r;
}
inline std::size_t checked_add(std::size_t a, std::size_t b) {
  std::size_t r = 0;
  if (__builtin_add_overflow(a, b, &r)) throw SizeOverflow("size overflows 64 bits");
  return r;
}

class ArenaPlan {
 public:
  static ArenaPlan dry() {
    ArenaPlan p;
    p.dry_ = true;
    return p;
  }

  // A buffer of `count` elements of U (parameters-type statistics, indices).
  template <typename U>
  void request(U*& slot, std::size_t count) {
    add(checked_mul(count, sizeof(U)), [&slot](void* p) { slot = static_cast<U*>(p); });
  }
  // A buffer of `count` elements of storage `s` (activations).
  void request(DevPtr& slot, std::size_t count, Storage s) {
    add(checked_mul(count, storage_bytes(s)), [&slot, s](void* p) { slot = DevPtr(p, s); });
  }
  // Dry plans only: every later request stands for `n` buffers of its size.
  void set_repeat(std::size_t n) {
    if (!dry_) throw std::logic_error("ArenaPlan::set_repeat: only a dry plan repeats requests");
    repeat_ = n;
  }
  // The bytes requested so far (each buffer 64-byte aligned): the size of the block commit takes.
  std::size_t planned_bytes() const { return total_; }

  // Allocates one block (each buffer 64-byte aligned), points every requested slot into it and
  // returns the block. The caller frees it with free_bytes.
  template <typename T>
  void* commit(Backend<T>& be) {
    if (dry_) throw std::logic_error("ArenaPlan::commit: a dry plan allocates nothing");
    auto* base = static_cast<char*>(be.alloc_bytes(total_));
    std::size_t off = 0;
    for (auto& s : slots_) {
      s.bind(base + off);
      off += s.bytes;
    }
    bytes_ = total_;
    slots_.clear();
    return base;
  }
  std::size_t bytes() const { return bytes_; }

 private:
  static std::size_t align(std::size_t b) { return checked_add(b, 63) / 64 * 64; }
  void add(std::size_t raw_bytes, std::function<void(void*)> bind) {
    const std::size_t bytes = align(raw_bytes);
    total_ = checked_add(total_, checked_mul(bytes, repeat_));
    if (!dry_) slots_.push_back({std::move(bind), bytes});
  }
  struct Slot {
    std::function<void(void*)> bind;  // points the requester's slot at its bytes
    std::size_t bytes;
  };
  std::vector<Slot> slots_;
  std::size_t total_ = 0, bytes_ = 0, repeat_ = 1;
  bool dry_ = false;
};

}  // namespace moetrain
