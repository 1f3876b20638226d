// bf16 rounding on the CPU: the one rule every bf16 operand of the CPU backend is made by (oneDNN's
// packed GEMM operands, attention's tiles), the same as the GPU's conversion.
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

// Two bf16 values in one 32-bit word, the first in the low half: the operand element of a bf16
// dot-product instruction (AVX-512-BF16's vdpbf16ps) along the summed dimension.
inline std::uint32_t bf16_pair(float first, float second) {
  return std::uint32_t(to_bf16(first)) | std::uint32_t(to_bf16(second)) << 16;
}

}  // namespace moetrain::cpu
