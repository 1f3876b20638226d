#include "moetrain/cpu_backend.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

#include "backend/cpu/ops.hpp"

namespace moetrain {

template <typename T>
const char* CpuBackend<T>::name() const {
  return sizeof(T) == 8 ? "cpu-fp64" : "cpu-fp32";
}

template <typename T>
void* CpuBackend<T>::alloc_bytes(std::size_t bytes) {
  const std::size_t rounded = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded ? rounded : 64);
  if (!p) throw std::bad_alloc();
  std::memset(p, 0, rounded ? rounded : 64);
  return p;
}
template <typename T>
void CpuBackend<T>::free_bytes(void* p) {
  std::free(p);
}
template <typename T>
void CpuBackend<T>::upload(void* dst, const void* src, std::size_t bytes) {
  if (bytes) std::memcpy(dst, src, bytes);
}
template <typename T>
void CpuBackend<T>::download(void* dst, const void* src, std::size_t bytes) {
  if (bytes) std::memcpy(dst, src, bytes);
}
template <typename T>
void CpuBackend<T>::copy(void* dst, const void* src, std::size_t bytes) {
  if (bytes) std::memmove(dst, src, bytes);
}
template <typename T>
void CpuBackend<T>::zero(void* dst, std::size_t bytes) {
  if (bytes) std::memset(dst, 0, bytes);
}

template <typename T>
void CpuBackend<T>::set_weights(const T*, std::size_t) {}  // one precision: no copy to keep

#define MOETRAIN_CPU_FORWARD(ret, name, params, args, flops) \
  template <typename T>                                      \
  ret CpuBackend<T>::name params {                           \
    return cpu::name<T> args;                                \
  }
MOETRAIN_BACKEND_OPS(MOETRAIN_CPU_FORWARD, T)
#undef MOETRAIN_CPU_FORWARD

template <typename T>
Storage CpuBackend<T>::activation_storage() const {
  return storage_of<T>();
}

template <typename T>
std::size_t CpuBackend<T>::attention_saved_elems(const AttentionShape& s) const {
  return cpu::attention_saved_elems(s);
}

template <typename T>
int CpuBackend<T>::head_chunk_rows(int rows, int vocab) const {
  // 2^18 logits (1 MiB of fp32), but at least 16 rows so that the GEMMs keep their efficiency.
  const int chunk = std::max(16, (1 << 18) / std::max(vocab, 1));
  return std::clamp(chunk, 1, std::max(rows, 1));
}

template <typename T>
std::size_t CpuBackend<T>::available_memory_bytes() const {
  return cpu::available_host_memory();
}

template class CpuBackend<float>;
template class CpuBackend<double>;

}  // namespace moetrain
