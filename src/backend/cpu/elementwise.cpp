// Residual-stream additions.
#include "backend/cpu/ops.hpp"

namespace moetrain::cpu {

template <typename T>
void add(T* out, const T* a, const T* b, std::size_t n) {
#pragma omp parallel for schedule(static)
  for (std::size_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

template <typename T>
void add_inplace(T* x, const T* y, std::size_t n) {
#pragma omp parallel for schedule(static)
  for (std::size_t i = 0; i < n; ++i) x[i] += y[i];
}

template void add<float>(float*, const float*, const float*, std::size_t);
template void add<double>(double*, const double*, const double*, std::size_t);
template void add_inplace<float>(float*, const float*, std::size_t);
template void add_inplace<double>(double*, const double*, std::size_t);

}  // namespace moetrain::cpu
