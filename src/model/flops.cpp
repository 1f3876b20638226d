#include "moetrain/flops.hpp"

namespace moetrain {

FlopCount flops_per_token(const ModelConfig& c) {
  FlopCount f;
  const double d = c.d_model, hd = c.head_dim, H = c.n_heads, Hkv = c.n_kv_heads;
  for (int l = 0; l < c.n_layers; ++l) {
    f.attn_proj += 2 * d * (H + 2 * Hkv) * hd + 2 * H * hd * d;
    f.attn_core += 2 * 2 * H * hd * (c.seq_len + 1) / 2.0;
    if (!is_moe_layer(c, l)) {
      f.ffn += 2 * 3 * d * c.dense_ff;
    } else {
      f.router += 2 * d * c.moe.n_experts;
      f.ffn += c.moe.top_k * 2 * 3 * d * c.moe.expert_ff;
      f.ffn += c.moe.n_shared_experts * 2 * 3 * d * c.moe.shared_ff;
    }
  }
  f.lm_head = 2 * d * c.vocab_size;
  return f;
}

}  // namespace moetrain
