// Typed device pointers: a buffer's address together with its storage type, so the Backend
// interface names what each buffer holds instead of assuming one element type for everything
// (docs/design.md §2.1). Parameters, gradients, optimizer state and statistics are the backend's
// master type T (plain T* in the op list); activations and GEMM operands are DevPtr / CDevPtr,
// whose storage the backend chooses (Backend::activation_storage: bf16 in either backend's bf16
// mode, else T).
//
// A DevPtr converts implicitly from a float* or double* (its storage is the pointer's type), and
// back only to a pointer of its own storage: as<U>() (and the implicit conversion the CPU backend's
// forwarding uses) throws std::logic_error for any other type, so no buffer is read as a type it
// does not hold. Arithmetic is in elements of its storage.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace moetrain {

enum class Storage : std::uint8_t { F32, F64, BF16 };

constexpr std::size_t storage_bytes(Storage s) {
  return s == Storage::F64 ? 8 : s == Storage::F32 ? 4 : 2;
}
constexpr const char* to_string(Storage s) {
  return s == Storage::F64 ? "f64" : s == Storage::F32 ? "f32" : "bf16";
}

template <typename U>
constexpr Storage storage_of() {
  using V = std::remove_cv_t<U>;
  static_assert(std::is_same_v<V, float> || std::is_same_v<V, double>,
                "storage_of: float or double (bf16 pointers are made with an explicit Storage)");
  return std::is_same_v<V, float> ? Storage::F32 : Storage::F64;
}

template <typename V>  // void or const void
class BasicDevPtr {
  template <typename U>
  using Elem = std::conditional_t<std::is_const_v<V>, const U, U>;

 public:
  BasicDevPtr() = default;
  BasicDevPtr(std::nullptr_t) {}  // NOLINT: a null pointer of any storage
  BasicDevPtr(V* p, Storage s) : p_(p), s_(s) {}
  template <typename U, typename = std::enable_if_t<std::is_floating_point_v<std::remove_cv_t<U>> &&
                                                    (std::is_const_v<V> || !std::is_const_v<U>)>>
  BasicDevPtr(U* p) : p_(p), s_(storage_of<U>()) {}  // NOLINT: implicit from a typed pointer
  // A mutable pointer converts to a const one.
  template <typename W, typename = std::enable_if_t<std::is_const_v<V> && !std::is_const_v<W>>>
  BasicDevPtr(const BasicDevPtr<W>& o) : p_(o.get()), s_(o.storage()) {}  // NOLINT

  V* get() const { return p_; }
  Storage storage() const { return s_; }
  std::size_t element_bytes() const { return storage_bytes(s_); }
  explicit operator bool() const { return p_ != nullptr; }

  BasicDevPtr operator+(std::size_t elems) const {
    using Byte = std::conditional_t<std::is_const_v<V>, const unsigned char, unsigned char>;
    return {static_cast<V*>(static_cast<Byte*>(p_) + elems * storage_bytes(s_)), s_};
  }

  // The pointer as its own element type U (float or double); any other U throws (a null pointer
  // is null as any type).
  template <typename U>
  U* as() const {
    static_assert(!std::is_const_v<V> || std::is_const_v<U>, "as: a const buffer stays const");
    if (p_ && storage_of<U>() != s_)
      throw std::logic_error(std::string("a ") + to_string(s_) + " buffer used as " +
                             to_string(storage_of<U>()));
    return static_cast<U*>(p_);
  }
  template <typename U, typename = std::enable_if_t<std::is_floating_point_v<std::remove_cv_t<U>>>>
  operator U*() const {  // NOLINT: the CPU backend forwards DevPtr arguments to its T* functions
    return as<U>();
  }

 private:
  V* p_ = nullptr;
  Storage s_ = Storage::F32;
};

using DevPtr = BasicDevPtr<void>;
using CDevPtr = BasicDevPtr<const void>;

}  // namespace moetrain
