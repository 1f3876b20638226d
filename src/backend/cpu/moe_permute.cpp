// MoE token permutation: group the (token, slot) assignments by expert so each expert runs one
// contiguous GEMM, and the weighted combine back. Stable in token order, and every reduction runs
// in slot order per token, so results are deterministic with no atomics.
#include <algorithm>
#include <vector>

#include "backend/cpu/ops.hpp"

namespace moetrain::cpu {

template <typename T>
void moe_permute(T* xg, int32_t* pos, int32_t* offsets, const T* x, const int32_t* topk,
                 const int32_t* counts, int tokens, int d, int n_experts, int k) {
  offsets[0] = 0;
  for (int e = 0; e < n_experts; ++e) offsets[e + 1] = offsets[e] + counts[e];
  std::vector<int32_t> next(offsets, offsets + n_experts);
  for (int a = 0; a < tokens * k; ++a) pos[a] = next[std::size_t(topk[a])]++;
#pragma omp parallel for schedule(static)
  for (int a = 0; a < tokens * k; ++a)
    std::copy_n(x + std::size_t(a / k) * d, d, xg + std::size_t(pos[a]) * d);
}

template <typename T>
void moe_permute_backward(T* dx, const T* dxg, const int32_t* pos, int tokens, int d, int k) {
#pragma omp parallel for schedule(static)
  for (int t = 0; t < tokens; ++t) {
    T* o = dx + std::size_t(t) * d;
    for (int j = 0; j < k; ++j) {
      const T* g = dxg + std::size_t(pos[t * k + j]) * d;
      for (int c = 0; c < d; ++c) o[c] += g[c];
    }
  }
}

template <typename T>
void moe_unpermute(T* y, const T* yg, const T* gates, const int32_t* pos, int tokens, int d,
                   int k) {
#pragma omp parallel for schedule(static)
  for (int t = 0; t < tokens; ++t) {
    T* o = y + std::size_t(t) * d;
    std::fill_n(o, d, T(0));
    for (int j = 0; j < k; ++j) {
      const T w = gates[t * k + j];
      const T* e = yg + std::size_t(pos[t * k + j]) * d;
      for (int c = 0; c < d; ++c) o[c] += w * e[c];
    }
  }
}

template <typename T>
void moe_unpermute_backward(T* dyg, T* dgates, const T* dy, const T* yg, const T* gates,
                            const int32_t* pos, int tokens, int d, int k) {
#pragma omp parallel for schedule(static)
  for (int t = 0; t < tokens; ++t) {
    const T* g = dy + std::size_t(t) * d;
    for (int j = 0; j < k; ++j) {
      const std::size_t row = std::size_t(pos[t * k + j]) * d;
      const T w = gates[t * k + j];
      T dot = 0;
      for (int c = 0; c < d; ++c) {
        dyg[row + c] = w * g[c];
        dot += g[c] * yg[row + c];
      }
      dgates[t * k + j] = dot;
    }
  }
}

MOETRAIN_CPU_INSTANTIATE(MOETRAIN_OPS_MOE_PERMUTE)

}  // namespace moetrain::cpu
