// Token embedding lookup and its backward.
#include <omp.h>

#include <algorithm>

#include "backend/cpu/ops.hpp"

namespace moetrain::cpu {

template <typename T, typename A>
void embedding_forward(A* out, const int32_t* tokens, const T* table, int n, int d) {
#pragma omp parallel for schedule(static)
  for (int i = 0; i < n; ++i) {
    const T* row = table + std::size_t(tokens[i]) * d;
    A* o = out + std::size_t(i) * d;
    for (int c = 0; c < d; ++c) o[c] = A(row[c]);
  }
}

// Repeated tokens add into the same row. Each thread owns a slice of the columns and walks the
// tokens in order, so the sum order is fixed: deterministic without atomics.
template <typename T, typename A>
void embedding_backward(T* dtable, const A* dout, const int32_t* tokens, int n, int d) {
#pragma omp parallel
  {
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int c0 = int(std::int64_t(d) * id / nt), c1 = int(std::int64_t(d) * (id + 1) / nt);
    for (int i = 0; i < n; ++i) {
      T* row = dtable + std::size_t(tokens[i]) * d;
      const A* g = dout + std::size_t(i) * d;
      for (int c = c0; c < c1; ++c) row[c] += g[c];
    }
  }
}

MOETRAIN_CPU_INSTANTIATE_ACT(MOETRAIN_OPS_EMBEDDING)

}  // namespace moetrain::cpu
