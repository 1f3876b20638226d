// MoE token permutation: group the (token, slot) assignments by expert so each expert runs one
// contiguous GEMM, and the weighted combine back. Stable in token order, and every reduction runs
// in slot order per token, so results are deterministic with no atomics.
#include <algorithm>
#include <vector>

#include "backend/cpu/lane_reduce.hpp"
#include "backend/cpu/ops.hpp"

namespace moetrain::cpu {

template <typename T, typename A>
void moe_permute(A* xg, int32_t* pos, int32_t* offsets, const A* x, const int32_t* topk,
                 const int32_t* counts, int tokens, int d, int n_experts, int k) {
  offsets[0] = 0;
  for (int e = 0; e < n_experts; ++e) offsets[e + 1] = offsets[e] + counts[e];
  std::vector<int32_t> next(offsets, offsets + n_experts);
  for (int a = 0; a < tokens * k; ++a) pos[a] = next[std::size_t(topk[a])]++;
#pragma omp parallel for schedule(static)
  for (int a = 0; a < tokens * k; ++a)
    std::copy_n(x + std::size_t(a / k) * d, d, xg + std::size_t(pos[a]) * d);
}

// The sums over a token's k slots run in T on a per-thread row, so bf16 activations are rounded
// once per element, not once per slot.
template <typename T, typename A>
void moe_permute_backward(A* dx, const A* dxg, const int32_t* pos, int tokens, int d, int k) {
#pragma omp parallel
  {
    std::vector<T> acc(static_cast<std::size_t>(d));
#pragma omp for schedule(static)
    for (int t = 0; t < tokens; ++t) {
      A* o = dx + std::size_t(t) * d;
      std::copy_n(o, d, acc.data());
      for (int j = 0; j < k; ++j) {
        const A* g = dxg + std::size_t(pos[t * k + j]) * d;
        for (int c = 0; c < d; ++c) acc[c] += T(g[c]);
      }
      std::copy_n(acc.data(), d, o);
    }
  }
}

template <typename T, typename A>
void moe_unpermute(A* y, const A* yg, const T* gates, const int32_t* pos, int tokens, int d,
                   int k) {
#pragma omp parallel
  {
    std::vector<T> acc(static_cast<std::size_t>(d));
#pragma omp for schedule(static)
    for (int t = 0; t < tokens; ++t) {
      std::fill(acc.begin(), acc.end(), T(0));
      for (int j = 0; j < k; ++j) {
        const T w = gates[t * k + j];
        const A* e = yg + std::size_t(pos[t * k + j]) * d;
        for (int c = 0; c < d; ++c) acc[c] += w * T(e[c]);
      }
      std::copy_n(acc.data(), d, y + std::size_t(t) * d);
    }
  }
}

template <typename T, typename A>
void moe_unpermute_backward(A* dyg, T* dgates, const A* dy, const A* yg, const T* gates,
                            const int32_t* pos, int tokens, int d, int k) {
#pragma omp parallel for schedule(static)
  for (int t = 0; t < tokens; ++t) {
    const A* g = dy + std::size_t(t) * d;
    for (int j = 0; j < k; ++j) {
      const std::size_t row = std::size_t(pos[t * k + j]) * d;
      const T w = gates[t * k + j];
      for (int c = 0; c < d; ++c) dyg[row + c] = A(w * T(g[c]));
      dgates[t * k + j] = lane_sum<T>(0, d, [&](int c) { return T(g[c]) * T(yg[row + c]); });
    }
  }
}

MOETRAIN_CPU_INSTANTIATE_ACT(MOETRAIN_OPS_MOE_PERMUTE)

}  // namespace moetrain::cpu
