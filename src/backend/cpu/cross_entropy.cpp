// Fused softmax cross-entropy: per-token loss, and dlogits written over the logits. A negative
// target marks padding (evaluation's last batch): zero loss and zero gradient.
#include <algorithm>
#include <cmath>

#include "backend/cpu/ops.hpp"

namespace moetrain::cpu {

template <typename T>
void cross_entropy(T* losses, double* loss_sum, T* logits, const int32_t* targets, int n, int vocab,
                   const T* grad_scale_ptr) {
  const bool grad = grad_scale_ptr != nullptr;
  const T grad_scale = grad ? *grad_scale_ptr : T(0);
#pragma omp parallel for schedule(static)
  for (int i = 0; i < n; ++i) {
    T* row = logits + std::size_t(i) * vocab;
    const int y = targets[i];
    if (y < 0) {  // padding: no loss, no gradient
      losses[i] = T(0);
      if (grad) std::fill_n(row, vocab, T(0));
      continue;
    }
    const T mx = *std::max_element(row, row + vocab);
    double sum = 0;
    for (int v = 0; v < vocab; ++v) sum += std::exp(double(row[v] - mx));
    const double lse = double(mx) + std::log(sum);
    losses[i] = T(lse - double(row[y]));
    if (grad) {
      const T inv = T(1.0 / sum);
      for (int v = 0; v < vocab; ++v) row[v] = std::exp(row[v] - mx) * inv * grad_scale;
      row[y] -= grad_scale;
    }
  }
  if (!loss_sum) return;
  double total = 0;  // in row order, after the parallel loop: the same bits for any thread count
  for (int i = 0; i < n; ++i) total += double(losses[i]);
  *loss_sum += total;
}

MOETRAIN_CPU_INSTANTIATE(MOETRAIN_OPS_CROSS_ENTROPY)

}  // namespace moetrain::cpu
