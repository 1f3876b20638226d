// The CPU backend's op implementations, one file per op family of backend_ops.hpp (forward and
// backward side by side), as free function templates instantiated for float and double in their
// family's file. CpuBackend forwards to these; backend_ops.hpp gives the contract of each op.
#pragma once

#include <cstddef>
#include <cstdint>

#include "backend/cpu/bf16.hpp"
#include "moetrain/backend.hpp"

namespace moetrain::cpu {

// The families whose ops take activations (backend_ops.hpp's AP / CAP) are templates on the
// master type T and the activations' element type A: T itself, or bf16 (bf16.hpp) for the float
// backend under train.precision = bf16. The others take T only.
#define MOETRAIN_CPU_ACTIVATION_FAMILIES(X, T, AP, CAP) \
  MOETRAIN_OPS_ELEMENTWISE(X, T, AP, CAP)               \
  MOETRAIN_OPS_EMBEDDING(X, T, AP, CAP)                 \
  MOETRAIN_OPS_RMSNORM(X, T, AP, CAP)                   \
  MOETRAIN_OPS_ROPE(X, T, AP, CAP)                      \
  MOETRAIN_OPS_ATTENTION(X, T, AP, CAP)                 \
  MOETRAIN_OPS_SWIGLU(X, T, AP, CAP)                    \
  MOETRAIN_OPS_CROSS_ENTROPY(X, T, AP, CAP)             \
  MOETRAIN_OPS_MOE_PERMUTE(X, T, AP, CAP)
#define MOETRAIN_CPU_MASTER_FAMILIES(X, T, AP, CAP) \
  MOETRAIN_OPS_GEMM(X, T, AP, CAP)                  \
  MOETRAIN_OPS_OPTIMIZER(X, T, AP, CAP)             \
  MOETRAIN_OPS_LINALG(X, T, AP, CAP)                \
  MOETRAIN_OPS_ROUTER(X, T, AP, CAP)

#define MOETRAIN_CPU_DECLARE(ret, name, params, args, flops) \
  template <typename T>                                      \
  ret name params;
MOETRAIN_CPU_MASTER_FAMILIES(MOETRAIN_CPU_DECLARE, T, T*, const T*)
#undef MOETRAIN_CPU_DECLARE
#define MOETRAIN_CPU_DECLARE_ACT(ret, name, params, args, flops) \
  template <typename T, typename A>                              \
  ret name params;
MOETRAIN_CPU_ACTIVATION_FAMILIES(MOETRAIN_CPU_DECLARE_ACT, T, A*, const A*)
#undef MOETRAIN_CPU_DECLARE_ACT

std::size_t attention_saved_elems(const AttentionShape& s);
// MemAvailable of /proc/meminfo, lowered to memory.max - memory.current of the cgroup v2 this
// process is in when that sets a limit; SIZE_MAX when neither is readable.
std::size_t available_host_memory();

// Explicit instantiation of a family's ops at the end of its file, e.g.
// MOETRAIN_CPU_INSTANTIATE(MOETRAIN_OPS_ROUTER): for float and double; an activation family's
// (MOETRAIN_CPU_INSTANTIATE_ACT) also for float with bf16 activations.
// (The element type is named explicitly: an op such as step_gate has no T in its parameters.)
#define MOETRAIN_CPU_INSTANTIATE_F32(ret, name, params, args, flops) \
  template ret name<float> params;
#define MOETRAIN_CPU_INSTANTIATE_F64(ret, name, params, args, flops) \
  template ret name<double> params;
#define MOETRAIN_CPU_INSTANTIATE(family)                            \
  family(MOETRAIN_CPU_INSTANTIATE_F32, float, float*, const float*) \
      family(MOETRAIN_CPU_INSTANTIATE_F64, double, double*, const double*)
#define MOETRAIN_CPU_INSTANTIATE_ACT_F32(ret, name, params, args, flops) \
  template ret name<float, float> params;
#define MOETRAIN_CPU_INSTANTIATE_ACT_F64(ret, name, params, args, flops) \
  template ret name<double, double> params;
#define MOETRAIN_CPU_INSTANTIATE_ACT_BF16(ret, name, params, args, flops) \
  template ret name<float, bf16> params;
#define MOETRAIN_CPU_INSTANTIATE_ACT(family)                                   \
  family(MOETRAIN_CPU_INSTANTIATE_ACT_F32, float, float*, const float*)        \
      family(MOETRAIN_CPU_INSTANTIATE_ACT_F64, double, double*, const double*) \
          family(MOETRAIN_CPU_INSTANTIATE_ACT_BF16, float, bf16*, const bf16*)

}  // namespace moetrain::cpu
