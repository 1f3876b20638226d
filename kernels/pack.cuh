// kernels/pack.cuh — packed element access shared by the bandwidth-bound kernels.
//
// Kernels are templated on the storage type (float or bf16) and do their math in fp32. They move
// V consecutive elements as one access (16 bytes when V = 16 / sizeof(T)), which is what lets a
// warp's loads and stores use full DRAM sectors; a pointer that is not aligned to the pack falls
// back to the scalar path, so every launcher checks aligned() first.
//
//   Pack<T, V>                 V elements of T, aligned to the whole pack.
//   to_float(x), from_float<T>(f)
//                              storage <-> fp32 (bf16: round to nearest even on the way in).
//   load(p, float (&out)[V]), store(p, const float (&in)[V])
//                              one pack, widened to / narrowed from fp32.
//   load_pack<T, V>(p), store_pack(p, pack)
//                              one pack as it is stored.
//   aligned(p, bytes)          host check that p is a multiple of `bytes`.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace moetrain::kernels {

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return bf16_to_float(v);
  }
}
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return float_to_bf16(v);
  }
}

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}
template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

template <typename T, int V>
__device__ __forceinline__ void load(const T* p, float (&out)[V]) {
  const Pack<T, V> pk = load_pack<T, V>(p);
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = to_float(pk.v[k]);
}
template <typename T, int V>
__device__ __forceinline__ void store(T* p, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int k = 0; k < V; ++k) pk.v[k] = from_float<T>(in[k]);
  store_pack(p, pk);
}

inline bool aligned(const void* p, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

}  // namespace moetrain::kernels
