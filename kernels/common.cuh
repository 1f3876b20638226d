// kernels/common.cuh — the portable layer every kernel file includes.
//
// One source, two builds:
//   * CUDA build (nvcc, sm_80 + sm_90): real kernels, launched with <<<>>> inside launch() only.
//   * SIMT build (g++, MOETRAIN_SIMT): the same .cu compiled as C++ against tests/simt/simt.hpp,
//     which runs each block's threads as fibers on the CPU (see simt.hpp and kernels/README.md).
// A host .cpp of the CUDA backend may include this header too: it then gets the runtime API,
// MOETRAIN_CUDA_CHECK and the bf16 type, without the device parts.
//
// API (namespace moetrain::kernels unless noted)
//   MOETRAIN_CUDA_CHECK(expr)            throws std::runtime_error "file:line: expr failed: name
//   (text)"
//                                        unless expr returns cudaSuccess.
//   launch(kernel, grid, block, smem_bytes, stream, args...)
//                                        the only way to launch a kernel. nvcc:
//                                        kernel<<<...>>>(args...) then a cudaGetLastError check (a
//                                        bad configuration throws), and opts in to more than 48 KiB
//                                        of dynamic shared memory; SIMT: runs the whole grid before
//                                        it returns (errors throw).
//   host_launch_count()                  launch() calls so far (the backend adds its library calls
//                                        and graph launches): launches per step in bench.
//   ceil_div(a, b)                       host/device integer helper for grid sizes.
//   dynamic_smem<T>()                    the launch's dynamic shared memory as T* (16-byte
//   aligned).
//                                        Never declare `extern __shared__` arrays yourself.
//   thread_rank(), block_threads(), lane_id(), warp_id()
//                                        linear thread index in the block (x fastest), threads per
//                                        block, index in the warp, warp index in the block.
//   warp_sum(v), warp_max(v), warp_min(v)
//                                        butterfly over the full warp (__shfl_xor_sync, offsets 16,
//                                        8, 4, 2, 1); every lane gets the result. All 32 lanes must
//                                        call.
//   block_sum(v), block_max(v), block_min(v)
//                                        every thread gets the reduction over the block: warp
//                                        butterfly, one partial per warp in shared memory, then
//                                        every warp reduces the partials (missing warps contribute
//                                        the identity). Contains two __syncthreads: all threads of
//                                        the block must call it; the block size must be a multiple
//                                        of 32 (at most 1024). The order of the float additions is
//                                        fixed, so results are deterministic.
//   bf16: float_to_bf16(x) (round to nearest even), bf16_to_float(h),
//         float_to_bf16_stochastic(x, rand_bits) (adds the low 16 random bits below the bf16 ulp,
//         then truncates: unbiased; NaN stays NaN, +-inf stays), bf16_bits(h), bf16_from_bits(u),
//         float_bits(x), float_from_bits(u).
//   random_u32(seed, index)              counter-based hash (splitmix64) for stochastic rounding
//   and dropout.
//
// Rules for kernels: plain CUDA C++ (no <<<>>>, no extern __shared__, no cooperative groups);
// inline PTX only inside a __device__ function that has an `#if defined(MOETRAIN_SIMT)`
// implementation with the same per-lane semantics; device functions defined in headers must be
// inline or __forceinline__.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#if defined(MOETRAIN_SIMT)
#include "simt.hpp"
#elif defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#else  // host C++ of the CUDA backend
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#endif

#define MOETRAIN_CUDA_CHECK(expr)                                                       \
  do {                                                                                  \
    const cudaError_t moetrain_cuda_status_ = (expr);                                   \
    if (moetrain_cuda_status_ != cudaSuccess)                                           \
      ::moetrain::kernels::cuda_fail(moetrain_cuda_status_, #expr, __FILE__, __LINE__); \
  } while (0)

namespace moetrain::kernels {

[[noreturn]] inline void cuda_fail(cudaError_t status, const char* expr, const char* file,
                                   int line) {
  throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + expr +
                           " failed: " + cudaGetErrorName(status) + " (" +
                           cudaGetErrorString(status) + ")");
}

// Host-side launches so far: every launch() call (one captured into a graph included), plus what
// the backend adds for its library calls and graph launches. `moetrain bench` reports it per step.
inline unsigned long long& host_launch_count() {
  static unsigned long long count = 0;
  return count;
}

}  // namespace moetrain::kernels

#if defined(__CUDACC__) || defined(MOETRAIN_SIMT)

namespace moetrain::kernels {

inline constexpr unsigned kFullMask = 0xffffffffu;
inline constexpr int kWarpSize = 32;

template <typename T>
__host__ __device__ __forceinline__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// ---- launch -------------------------------------------------------------------------------------
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
            Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "launch: wrong number of kernel arguments");
  ++host_launch_count();
#if defined(MOETRAIN_SIMT)
  ::simt::launch(kernel, grid, block, smem_bytes, stream, std::forward<Args>(args)...);
#else
  if (smem_bytes > 48 * 1024) {
    MOETRAIN_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem_bytes)));
  }
  // clang-format would split the launch chevrons.
  // clang-format off
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
  // clang-format on
  MOETRAIN_CUDA_CHECK(cudaGetLastError());
#endif
}

// ---- dynamic shared memory ----------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
#if defined(MOETRAIN_SIMT)
  return reinterpret_cast<T*>(::simt::dynamic_smem());
#else
  extern __shared__ __align__(16) unsigned char moetrain_dynamic_smem_[];
  return reinterpret_cast<T*>(moetrain_dynamic_smem_);
#endif
}

// ---- thread geometry ----------------------------------------------------------------------------
__device__ __forceinline__ unsigned thread_rank() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
__device__ __forceinline__ unsigned block_threads() {
  return blockDim.x * blockDim.y * blockDim.z;
}
__device__ __forceinline__ unsigned lane_id() {
  return thread_rank() & 31u;
}
__device__ __forceinline__ unsigned warp_id() {
  return thread_rank() >> 5;
}

// ---- reductions ---------------------------------------------------------------------------------
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
  template <typename T>
  __device__ __forceinline__ static T identity() {
    return T(0);
  }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
  __device__ __forceinline__ double operator()(double a, double b) const { return fmax(a, b); }
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
  template <typename T>
  __device__ __forceinline__ static T identity() {
    if constexpr (std::is_floating_point_v<T>) {
      return -static_cast<T>(INFINITY);
    } else {
      return std::is_signed_v<T> ? T(T(1) << (sizeof(T) * 8 - 1)) : T(0);  // lowest value
    }
  }
};
struct MinOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fminf(a, b); }
  __device__ __forceinline__ double operator()(double a, double b) const { return fmin(a, b); }
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a < b ? a : b;
  }
  template <typename T>
  __device__ __forceinline__ static T identity() {
    if constexpr (std::is_floating_point_v<T>) {
      return static_cast<T>(INFINITY);
    } else {
      return std::is_signed_v<T> ? T(~(T(1) << (sizeof(T) * 8 - 1))) : T(~T(0));  // highest value
    }
  }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  return warp_reduce(v, SumOp{});
}
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  return warp_reduce(v, MaxOp{});
}
template <typename T>
__device__ __forceinline__ T warp_min(T v) {
  return warp_reduce(v, MinOp{});
}

template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op) {
  __shared__ T partials[32];
  const unsigned lane = lane_id(), warp = warp_id(), nwarps = (block_threads() + 31u) >> 5;
  v = warp_reduce(v, op);
  __syncthreads();  // a previous block_reduce may still be reading `partials`
  if (lane == 0) partials[warp] = v;
  __syncthreads();
  T r = lane < nwarps ? partials[lane] : Op::template identity<T>();
  return warp_reduce(r, op);
}
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  return block_reduce(v, SumOp{});
}
template <typename T>
__device__ __forceinline__ T block_max(T v) {
  return block_reduce(v, MaxOp{});
}
template <typename T>
__device__ __forceinline__ T block_min(T v) {
  return block_reduce(v, MinOp{});
}

// ---- bits and bf16 ------------------------------------------------------------------------------
__host__ __device__ __forceinline__ uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}
__host__ __device__ __forceinline__ float float_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}
__host__ __device__ __forceinline__ uint16_t bf16_bits(__nv_bfloat16 h) {
  return __bfloat16_as_ushort(h);
}
__host__ __device__ __forceinline__ __nv_bfloat16 bf16_from_bits(uint16_t u) {
  return __ushort_as_bfloat16(u);
}
__host__ __device__ __forceinline__ float bf16_to_float(__nv_bfloat16 h) {
  return __bfloat162float(h);
}
__host__ __device__ __forceinline__ __nv_bfloat16 float_to_bf16(float x) {
  return __float2bfloat16_rn(x);
}

// Stochastic rounding: rounds |x| up to the next bf16 with probability (dropped bits) / 2^16,
// using the low 16 bits of rand_bits. Values beyond the largest bf16 may round to inf.
__host__ __device__ __forceinline__ __nv_bfloat16 float_to_bf16_stochastic(float x,
                                                                           uint32_t rand_bits) {
  const uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_from_bits(0x7fffu);  // NaN
  if ((u & 0x7fffffffu) == 0x7f800000u)
    return bf16_from_bits(static_cast<uint16_t>(u >> 16));  // inf
  return bf16_from_bits(static_cast<uint16_t>((u + (rand_bits & 0xffffu)) >> 16));
}

// ---- counter-based random numbers ---------------------------------------------------------------
__host__ __device__ __forceinline__ uint32_t random_u32(uint64_t seed, uint64_t index) {
  uint64_t z = seed + (index + 1) * 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return static_cast<uint32_t>((z ^ (z >> 31)) >> 32);
}

}  // namespace moetrain::kernels

#endif  // __CUDACC__ || MOETRAIN_SIMT
