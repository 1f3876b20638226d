// Fused softmax cross-entropy: per-token loss, and dlogits written over the logits. A negative
// target marks padding (evaluation's last batch): zero loss and zero gradient. The exp of a row
// is vector_exp's, in place when the gradient is wanted and the logits are of the math type T (the
// row becomes the softmax, then the gradient); otherwise on a per-thread row of T, so the logits
// stay as they were without a gradient, and bf16 logits are rounded once, as the gradient.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "backend/cpu/lane_reduce.hpp"
#include "backend/cpu/ops.hpp"
#include "backend/cpu/vector_exp.hpp"

namespace moetrain::cpu {

template <typename T, typename A>
void cross_entropy(T* losses, double* loss_sum, A* logits, const int32_t* targets, int n, int vocab,
                   const T* grad_scale_ptr) {
  const bool grad = grad_scale_ptr != nullptr;
  const T grad_scale = grad ? *grad_scale_ptr : T(0);
#pragma omp parallel
  {
    constexpr bool in_place = std::is_same_v<A, T>;
    std::vector<T> copy(grad && in_place ? 0 : std::size_t(vocab));
#pragma omp for schedule(static)
    for (int i = 0; i < n; ++i) {
      A* row = logits + std::size_t(i) * vocab;
      const int y = targets[i];
      if (y < 0) {  // padding: no loss, no gradient
        losses[i] = T(0);
        if (grad) std::fill_n(row, vocab, A(0.0f));
        continue;
      }
      T* e;
      if constexpr (in_place)
        e = grad ? row : std::copy_n(row, vocab, copy.data()) - vocab;
      else
        e = std::copy_n(row, vocab, copy.data()) - vocab;
      const T mx = row_max<T>(e, vocab);
      const T target_logit = e[y];
      const T sum = exp_shifted_sum(e, vocab, mx);
      losses[i] = T(double(mx) + std::log(double(sum)) - double(target_logit));
      if (grad) {
        const T s = grad_scale / sum;
        for (int v = 0; v < vocab; ++v) e[v] *= s;
        e[y] -= grad_scale;
        if constexpr (!in_place) std::copy_n(e, vocab, row);
      }
    }
  }
  if (!loss_sum) return;
  double total = 0;  // in row order, after the parallel loop: the same bits for any thread count
  for (int i = 0; i < n; ++i) total += double(losses[i]);
  *loss_sum += total;
}

MOETRAIN_CPU_INSTANTIATE_ACT(MOETRAIN_OPS_CROSS_ENTROPY)

}  // namespace moetrain::cpu
