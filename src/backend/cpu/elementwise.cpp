// Residual-stream addition.
#include "backend/cpu/ops.hpp"

namespace moetrain::cpu {

template <typename T>
void add_inplace(T* x, const T* y, std::size_t n) {
#pragma omp parallel for schedule(static)
  for (std::size_t i = 0; i < n; ++i) x[i] += y[i];
}

MOETRAIN_CPU_INSTANTIATE(MOETRAIN_OPS_ELEMENTWISE)

}  // namespace moetrain::cpu
