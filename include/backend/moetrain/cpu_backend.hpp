// CpuBackend: the Backend on the host, in float (training) or double (gradient checks).
// The float backend's GEMM ops run on oneDNN's matmul, with fp32 or bf16 operands
// (CpuBackendOptions::bf16) and fp32 accumulation; double's (the gradient checks) and the GEMMs
// inside attention's tiles on OpenBLAS; loops are parallel with OpenMP. The ops live in
// src/backend/cpu/, one file per family of backend_ops.hpp.
#pragma once

#include <memory>

#include "moetrain/backend.hpp"

namespace moetrain {

namespace cpu {
class OnednnMatmul;
}

struct CpuBackendOptions {
  // train.precision = bf16: activations are stored in bf16 (activation_storage BF16; each op
  // computes in fp32 and rounds its outputs once, to nearest even), GEMMs read bf16 operands
  // (fp32 ones, such as the weights, rounded) and accumulate in fp32; master weights, gradients,
  // optimizer state and statistics stay fp32, as on the GPU. float only.
  bool bf16 = false;
};

template <typename T>
class CpuBackend final : public Backend<T> {
 public:
  explicit CpuBackend(const CpuBackendOptions& options = {});
  ~CpuBackend() override;
  const char* name() const override;
  MOETRAIN_BACKEND_MEMORY(MOETRAIN_OP_OVERRIDE, T)
  MOETRAIN_BACKEND_OPS(MOETRAIN_OP_OVERRIDE, T)
  MOETRAIN_BACKEND_QUERIES(MOETRAIN_QUERY_OVERRIDE, T)

 private:
  void wrote(const void* dst, std::size_t bytes);
  template <typename... Args>
  void note_writes(const Args&... args);

  bool bf16_;
  std::unique_ptr<cpu::OnednnMatmul> matmul_;  // float only
};

extern template class CpuBackend<float>;
extern template class CpuBackend<double>;

}  // namespace moetrain
