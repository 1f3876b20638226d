// The shapes backend ops take as one argument, and the router type they switch on. The config maps
// its strings to these (config.hpp includes this header; the backend does not include the config).
#pragma once

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
};

struct RouterShape {
  int tokens, n_experts, top_k;
  RouterType type;
  double route_scale;
};

}  // namespace moetrain
