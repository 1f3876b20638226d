// CpuBackend: the Backend on the host, in float (training) or double (gradient checks).
// GEMMs go through OpenBLAS, loops are parallel with OpenMP; the ops live in src/backend/cpu/,
// one file per family of backend_ops.hpp.
#pragma once

#include "moetrain/backend.hpp"

namespace moetrain {

template <typename T>
class CpuBackend final : public Backend<T> {
 public:
  const char* name() const override;
  MOETRAIN_BACKEND_MEMORY(MOETRAIN_OP_OVERRIDE, T)
  MOETRAIN_BACKEND_OPS(MOETRAIN_OP_OVERRIDE, T)
  MOETRAIN_BACKEND_QUERIES(MOETRAIN_QUERY_OVERRIDE, T)
};

extern template class CpuBackend<float>;
extern template class CpuBackend<double>;

}  // namespace moetrain
