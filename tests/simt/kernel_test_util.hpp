// Helpers shared by the kernel tests (every tests/simt/test_*.cpp that needs them), in the
// simulator and on a GPU: device buffers, storage-type conversions (fp32 / bf16), relative error,
// NaN checks, random inputs, and the schedules (schedules.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include <catch2/catch.hpp>

#include "common.cuh"
#include "schedules.hpp"

namespace kernel_test {

namespace mk = moetrain::kernels;
using bf16 = __nv_bfloat16;

// A cudaMalloc'ed array of n T (at least one element is allocated), freed at scope exit.
template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceBuffer(size_t count) : n(count) {
    MOETRAIN_CUDA_CHECK(cudaMalloc(&ptr, std::max<size_t>(count, 1) * sizeof(T)));
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void upload(const std::vector<T>& host) {
    MOETRAIN_CUDA_CHECK(cudaMemcpy(ptr, host.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  void poison() { MOETRAIN_CUDA_CHECK(cudaMemset(ptr, 0xff, n * sizeof(T))); }
  std::vector<T> download() const {
    std::vector<T> host(n);
    MOETRAIN_CUDA_CHECK(cudaMemcpy(host.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
  // The first element (a scalar result).
  T get() const {
    T v;
    MOETRAIN_CUDA_CHECK(cudaMemcpy(&v, ptr, sizeof(T), cudaMemcpyDeviceToHost));
    return v;
  }
};

// A stream (cudaStreamCreateWithFlags) and an event (no timing), destroyed at scope exit.
struct Stream {
  cudaStream_t s = nullptr;
  explicit Stream(unsigned flags) { MOETRAIN_CUDA_CHECK(cudaStreamCreateWithFlags(&s, flags)); }
  ~Stream() { cudaStreamDestroy(s); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  void sync() const { MOETRAIN_CUDA_CHECK(cudaStreamSynchronize(s)); }
};
struct Event {
  cudaEvent_t e = nullptr;
  Event() { MOETRAIN_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming)); }
  ~Event() { cudaEventDestroy(e); }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
};

// start, start + 1, ..., start + n - 1; and v times s.
inline std::vector<float> iota_floats(size_t n, float start) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = start + float(i);
  return v;
}
inline std::vector<float> times(std::vector<float> v, float s) {
  for (float& x : v) x *= s;
  return v;
}

// ||out - ref|| / ||ref|| (||out - ref|| when ref is zero).

inline double rel_error(const std::vector<float>& out, const std::vector<float>& ref) {
  REQUIRE(out.size() == ref.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const double d = double(out[i]) - double(ref[i]);
    num += d * d;
    den += double(ref[i]) * double(ref[i]);
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}
// |out - ref| / |ref| of two scalars.
inline double rel_error(double out, double ref) {
  return std::fabs(out - ref) / std::max(1e-300, std::fabs(ref));
}

inline bool has_nan(const std::vector<float>& v) {
  return std::any_of(v.begin(), v.end(), [](float x) { return std::isnan(x); });
}

// The bits of a float, and the float of given bits.
inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
// Every element holds the poison bytes 0xFF (cudaMalloc's fill, an async download not arrived).
inline bool all_poison(const std::vector<float>& v) {
  return std::all_of(v.begin(), v.end(), [](float x) { return bits_of(x) == 0xffffffffu; });
}

template <typename T>
std::vector<T> to_storage(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if constexpr (std::is_same_v<T, float>) {
      out[i] = v[i];
    } else {
      out[i] = mk::float_to_bf16(v[i]);
    }
  }
  return out;
}

template <typename T>
std::vector<float> to_float(const std::vector<T>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if constexpr (std::is_same_v<T, float>) {
      out[i] = v[i];
    } else {
      out[i] = mk::bf16_to_float(v[i]);
    }
  }
  return out;
}

// The values a T buffer can hold: inputs are rounded before the reference sees them.
template <typename T>
std::vector<float> representable(const std::vector<float>& v) {
  return to_float(to_storage<T>(v));
}

// n draws of N(0, scale^2).
inline std::vector<float> random_floats(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

}  // namespace kernel_test
