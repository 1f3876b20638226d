// Residual-stream addition.
#include "backend/cpu/ops.hpp"

namespace moetrain::cpu {

template <typename T, typename A>
void add_inplace(A* x, const A* y, std::size_t n) {
#pragma omp parallel for schedule(static)
  for (std::size_t i = 0; i < n; ++i) x[i] += y[i];
}

MOETRAIN_CPU_INSTANTIATE_ACT(MOETRAIN_OPS_ELEMENTWISE)

}  // namespace moetrain::cpu
