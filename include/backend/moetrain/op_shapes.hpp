// The shapes backend ops take as one argument, and the router type they switch on. The config maps
// its strings to these (config.hpp includes this header; the backend does not include the config).
#pragma once

#include <cstddef>

namespace moetrain {

enum class RouterType { SoftmaxTopK, SigmoidBias };

// Shape of one attention call. The fused qkv buffer has rows of width (n_heads + 2 * n_kv_heads)
// * head_dim: all query heads, then all key heads, then all value heads. Query head h uses kv
// head h / (n_heads / n_kv_heads), as HF's repeat_kv does.
struct AttentionShape {
  int batch, seq, n_heads, n_kv_heads, head_dim;
  int qkv_width() const { return (n_heads + 2 * n_kv_heads) * head_dim; }
  int out_width() const { return n_heads * head_dim; }
  int rows() const { return batch * seq; }
  // batch * n_heads * seq * seq, the causal softmax's probabilities (in 64 bits; SIZE_MAX when
  // that does not fit, so a size computed from it fails its overflow check).
  std::size_t probs_elems() const {
    std::size_t n = 0;
    if (__builtin_mul_overflow(std::size_t(batch), std::size_t(n_heads), &n) ||
        __builtin_mul_overflow(n, std::size_t(seq), &n) ||
        __builtin_mul_overflow(n, std::size_t(seq), &n))
      return ~std::size_t(0);
    return n;
  }
};

struct RouterShape {
  int tokens, n_experts, top_k;
  RouterType type;
  double route_scale;
};

// The device doubles of an optimizer step's verdict, written by step_gate and read by the update
// ops (docs/design.md §4): the gradients' global sum of squares, the clipping coefficient the
// gradients are scaled by (1: none), and skip (nonzero: a gradient norm or a loss is not finite,
// and every update op leaves its buffers as they are).
struct StepGate {
  static constexpr int kGradSumSquares = 0, kClipCoef = 1, kSkip = 2, kSize = 3;
};

// QK-clip's factors for `matrices` q_proj / k_proj matrices (docs/design.md §4). smax is
// [slots][n_layers][n_heads] (one slot per micro-batch; a head's S_max is the max over the slots),
// mats is [matrices][2] = (layer, 1 for q_proj or 0 for k_proj), factors is [matrices][heads_ld]:
// a q head's rows scale by (tau / S_max)^alpha when S_max > tau; a kv head's rows by
// min over its query group of (tau / S_max)^(1 - alpha); every other factor is 1.
struct QkClipShape {
  int matrices, slots, n_layers, n_heads, n_kv_heads, heads_ld;
  double tau, alpha;
};

}  // namespace moetrain
