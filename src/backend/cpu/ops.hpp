// The CPU backend's op implementations, one file per op family of backend_ops.hpp (forward and
// backward side by side), as free function templates instantiated for float and double in their
// family's file. CpuBackend forwards to these; backend_ops.hpp gives the contract of each op.
#pragma once

#include <cstddef>
#include <cstdint>

#include "moetrain/backend.hpp"

namespace moetrain::cpu {

#define MOETRAIN_CPU_DECLARE(ret, name, params, args, flops) \
  template <typename T>                                      \
  ret name params;
MOETRAIN_BACKEND_OPS_AS(MOETRAIN_CPU_DECLARE, T, T*, const T*)
#undef MOETRAIN_CPU_DECLARE

std::size_t attention_saved_elems(const AttentionShape& s);
// attention_forward / attention_backward with bf16 tile products (fp32 accumulation, softmax and
// statistics in fp32): the float backend's under train.precision = bf16.
void attention_forward_bf16(float* out, float* lse, float* smax, const float* qkv,
                            const AttentionShape& s);
void attention_backward_bf16(float* dqkv, const float* dout, const float* qkv, const float* out,
                             const float* lse, const AttentionShape& s);
// MemAvailable of /proc/meminfo, lowered to memory.max - memory.current of the cgroup v2 this
// process is in when that sets a limit; SIZE_MAX when neither is readable.
std::size_t available_host_memory();

// Explicit instantiation of a family's ops for float and double, at the end of its file, e.g.
// MOETRAIN_CPU_INSTANTIATE(MOETRAIN_OPS_ROPE).
// (The element type is named explicitly: an op such as step_gate has no T in its parameters.)
#define MOETRAIN_CPU_INSTANTIATE_F32(ret, name, params, args, flops) \
  template ret name<float> params;
#define MOETRAIN_CPU_INSTANTIATE_F64(ret, name, params, args, flops) \
  template ret name<double> params;
#define MOETRAIN_CPU_INSTANTIATE(family)                            \
  family(MOETRAIN_CPU_INSTANTIATE_F32, float, float*, const float*) \
      family(MOETRAIN_CPU_INSTANTIATE_F64, double, double*, const double*)

}  // namespace moetrain::cpu
