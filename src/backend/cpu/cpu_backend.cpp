#include "moetrain/cpu_backend.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "backend/cpu/onednn_matmul.hpp"
#include "backend/cpu/ops.hpp"

namespace moetrain {

template <typename T>
CpuBackend<T>::CpuBackend(const CpuBackendOptions& options) : bf16_(options.bf16) {
  if constexpr (std::is_same_v<T, float>)
    matmul_ = std::make_unique<cpu::OnednnMatmul>(options.bf16);
  else if (options.bf16)
    throw std::invalid_argument("CpuBackend<double>: bf16 GEMMs are for the float backend only");
}
template <typename T>
CpuBackend<T>::~CpuBackend() = default;

template <typename T>
const char* CpuBackend<T>::name() const {
  if (sizeof(T) == 8) return "cpu-fp64";
  return bf16_ ? "cpu-bf16" : "cpu-fp32";
}

template <typename T>
void* CpuBackend<T>::alloc_bytes(std::size_t bytes) {
  const std::size_t rounded = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded ? rounded : 64);
  if (!p) throw std::bad_alloc();
  wrote(p, rounded ? rounded : 64);  // it may reuse the addresses of a freed operand's packed copy
  std::memset(p, 0, rounded ? rounded : 64);
  return p;
}
template <typename T>
void CpuBackend<T>::free_bytes(void* p) {
  std::free(p);
}
template <typename T>
void CpuBackend<T>::upload(void* dst, const void* src, std::size_t bytes) {
  wrote(dst, bytes);
  if (bytes) std::memcpy(dst, src, bytes);
}
template <typename T>
void CpuBackend<T>::download(void* dst, const void* src, std::size_t bytes) {
  if (bytes) std::memcpy(dst, src, bytes);
}
template <typename T>
void CpuBackend<T>::copy(void* dst, const void* src, std::size_t bytes) {
  wrote(dst, bytes);
  if (bytes) std::memmove(dst, src, bytes);
}
template <typename T>
void CpuBackend<T>::zero(void* dst, std::size_t bytes) {
  wrote(dst, bytes);
  if (bytes) std::memset(dst, 0, bytes);
}

// bf16: the weights' bf16 copy and the packed copies of other operands live in the matmul, which
// must hear of every write that may touch their sources. A memory op names its bytes; any other
// op with a float output drops every packed copy (its outputs' ends are unknown) and has its
// mutable pointer arguments (T*, DevPtr) checked against the weights where they start, which is
// exact because the parameter buffer is an allocation of its own: a pointer into another allocation
// never reaches it. A GEMM's C is checked by the matmul itself, so that a linear layer's two
// backward products share the packed dy.
template <typename T>
void CpuBackend<T>::set_weights(const T* weights, std::size_t count) {
  if constexpr (std::is_same_v<T, float>)
    if (bf16_) matmul_->set_weights(weights, count);
}
template <typename T>
void CpuBackend<T>::wrote(const void* dst, std::size_t bytes) {
  if (bf16_) matmul_->wrote(dst, bytes);
}
template <typename T>
template <typename... Args>
void CpuBackend<T>::note_writes(const Args&... args) {
  if (!bf16_) return;
  auto one = [this](const auto& a) {
    using A = std::decay_t<decltype(a)>;
    if constexpr (std::is_same_v<A, T*>)
      matmul_->op_wrote(a);
    else if constexpr (std::is_same_v<A, DevPtr>)
      matmul_->op_wrote(a.get());
  };
  (one(args), ...);
}

// An activation argument as the op's element type A (the backend's activation storage; any other
// storage throws, as DevPtr's own conversion does); every other argument as it is.
template <typename A>
A* activation_ptr(const void* p, Storage storage) {
  if constexpr (std::is_same_v<A, cpu::bf16>) {
    if (p && storage != Storage::BF16)
      throw std::logic_error(std::string("a ") + to_string(storage) +
                             " buffer used as bf16 activations");
    return static_cast<A*>(const_cast<void*>(p));
  } else {
    return DevPtr(const_cast<void*>(p), storage).as<A>();
  }
}
template <typename A, typename X>
decltype(auto) as_activation(X&& x) {
  using D = std::decay_t<X>;
  if constexpr (std::is_same_v<D, DevPtr>)
    return activation_ptr<A>(x.get(), x.storage());
  else if constexpr (std::is_same_v<D, CDevPtr>)
    return static_cast<const A*>(activation_ptr<A>(x.get(), x.storage()));
  else
    return std::forward<X>(x);
}
// f with each activation argument as A*.
template <typename A, typename F>
auto activations_as(F f) {
  return [f](auto&&... x) { return f(as_activation<A>(std::forward<decltype(x)>(x))...); };
}

// Ops on master data only.
#define MOETRAIN_CPU_FORWARD(ret, name, params, args, flops) \
  template <typename T>                                      \
  ret CpuBackend<T>::name params {                           \
    note_writes args;                                        \
    return cpu::name<T> args;                                \
  }
MOETRAIN_OPS_OPTIMIZER(MOETRAIN_CPU_FORWARD, T, DevPtr, CDevPtr)
MOETRAIN_OPS_LINALG(MOETRAIN_CPU_FORWARD, T, DevPtr, CDevPtr)
MOETRAIN_OPS_ROUTER(MOETRAIN_CPU_FORWARD, T, DevPtr, CDevPtr)
#undef MOETRAIN_CPU_FORWARD

// Ops on activations: of the master type, or bf16 in the float backend's bf16 mode.
#define MOETRAIN_CPU_FORWARD_ACT(ret, name, params, args, flops)                      \
  template <typename T>                                                               \
  ret CpuBackend<T>::name params {                                                    \
    note_writes args;                                                                 \
    if constexpr (std::is_same_v<T, float>)                                           \
      if (bf16_)                                                                      \
        return activations_as<cpu::bf16>(                                             \
            [](auto&&... a) { return cpu::name<T, cpu::bf16>(a...); }) args;          \
    return activations_as<T>([](auto&&... a) { return cpu::name<T, T>(a...); }) args; \
  }
MOETRAIN_CPU_ACTIVATION_FAMILIES(MOETRAIN_CPU_FORWARD_ACT, T, DevPtr, CDevPtr)
#undef MOETRAIN_CPU_FORWARD_ACT

// The GEMM family: oneDNN's for float (the matmul holds the bf16 state), OpenBLAS's for double.
// (No note_writes: the matmul tracks C's exact extent.)
#define MOETRAIN_CPU_FORWARD_GEMM(ret, name, params, args, flops) \
  template <typename T>                                           \
  ret CpuBackend<T>::name params {                                \
    if constexpr (std::is_same_v<T, float>)                       \
      return matmul_->name args;                                  \
    else                                                          \
      return cpu::name<T> args;                                   \
  }
MOETRAIN_OPS_GEMM(MOETRAIN_CPU_FORWARD_GEMM, T, DevPtr, CDevPtr)
#undef MOETRAIN_CPU_FORWARD_GEMM

template <typename T>
Storage CpuBackend<T>::activation_storage() const {
  return bf16_ ? Storage::BF16 : storage_of<T>();
}

template <typename T>
std::size_t CpuBackend<T>::attention_saved_elems(const AttentionShape& s) const {
  return cpu::attention_saved_elems(s);
}

template <typename T>
int CpuBackend<T>::head_chunk_rows(int rows, int vocab) const {
  // 2^21 logits (8 MiB of fp32: the chunk's logits stay in a 32 MiB L3 between the lm_head GEMM,
  // cross-entropy and the two gradient GEMMs), but at least 64 rows. Fewer rows starve the GEMMs:
  // at vocab 4096, d 256 on a Zen 4 core pair, 64-row chunks ran the forward product at 122
  // GFLOP/s and 512-row ones at 195 (the peak 213), and the weight gradient, accumulated once per
  // chunk, rereads its [V, d] sum 8x less often.
  const int chunk = std::max(64, (1 << 21) / std::max(vocab, 1));
  return std::clamp(chunk, 1, std::max(rows, 1));
}

template <typename T>
std::size_t CpuBackend<T>::available_memory_bytes() const {
  return cpu::available_host_memory();
}

template class CpuBackend<float>;
template class CpuBackend<double>;

}  // namespace moetrain
