// bf16 on the CPU: the one rounding rule every bf16 value of the CPU backend is made by (its bf16
// activations, oneDNN's packed GEMM operands, attention's tiles), the same as the GPU's conversion,
// and the element type of its bf16 activation storage.
#pragma once

#include <cstdint>
#include <cstring>

namespace moetrain::cpu {

// Round to nearest even (NaN stays NaN). Branch-free, so the loops over it vectorise.
inline std::uint16_t to_bf16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const std::uint32_t quiet_nan = (u >> 16) | 0x40u;
  return std::uint16_t((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

inline float from_bf16(std::uint16_t h) {
  const std::uint32_t u = std::uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// An element of the float backend's activations under train.precision = bf16 (activation_storage
// BF16). It widens to float exactly and is written from float by to_bf16, so an op's template reads
// and writes it as it would a float and does its arithmetic in fp32: one rounding per stored value.
struct bf16 {
  std::uint16_t bits;
  bf16() = default;
  bf16(float f) : bits(to_bf16(f)) {}                 // NOLINT: implicit, as a float store
  operator float() const { return from_bf16(bits); }  // NOLINT: implicit, as a float load
  bf16& operator+=(float f) { return *this = float(*this) + f; }
  bf16& operator*=(float f) { return *this = float(*this) * f; }
};
static_assert(sizeof(bf16) == 2);

// The bf16 bits of a value of either storage (a bf16 one as it is).
inline std::uint16_t bf16_bits(float f) {
  return to_bf16(f);
}
inline std::uint16_t bf16_bits(bf16 h) {
  return h.bits;
}

// Two bf16 values in one 32-bit word, the first in the low half: the operand element of a bf16
// dot-product instruction (AVX-512-BF16's vdpbf16ps) along the summed dimension.
template <typename A, typename B>
std::uint32_t bf16_pair(A first, B second) {
  return std::uint32_t(bf16_bits(first)) | std::uint32_t(bf16_bits(second)) << 16;
}

}  // namespace moetrain::cpu
