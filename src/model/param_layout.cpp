#include "moetrain/param_layout.hpp"

#include <cmath>
#include <stdexcept>

namespace moetrain {

bool is_hidden_matrix(ParamRole role) {
  switch (role) {
    case ParamRole::AttnQ:
    case ParamRole::AttnK:
    case ParamRole::AttnV:
    case ParamRole::AttnO:
    case ParamRole::FfnW1:
    case ParamRole::FfnW3:
    case ParamRole::FfnW2:
      return true;
    default:
      return false;
  }
}

int grad_ready_stage(const ParamTensor& t, int n_layers) {
  if (t.layer >= 0) return backward_stage(t.layer, n_layers);
  // The final norm and an untied lm_head are final with the last layer.
  return backward_stage(t.role == ParamRole::Embedding ? -1 : n_layers - 1, n_layers);
}

std::size_t ParamLayout::add(std::string name, std::vector<std::int64_t> shape, ParamRole role,
                             int layer, double init_std) {
  ParamTensor t;
  t.name = std::move(name);
  t.numel = 1;
  for (auto s : shape) t.numel *= std::size_t(s);
  t.shape = std::move(shape);
  t.offset = total_;
  t.role = role;
  t.layer = layer;
  t.init_std = init_std;
  total_ += t.numel;
  tensors_.push_back(std::move(t));
  return tensors_.back().offset;
}

SwiGluOffsets ParamLayout::add_swiglu(const std::string& prefix, int layer, int d, int ff,
                                      double std, double out_std) {
  SwiGluOffsets o;
  o.ff = ff;
  o.w13 = add(prefix + ".w1.weight", {ff, d}, ParamRole::FfnW1, layer, std);
  add(prefix + ".w3.weight", {ff, d}, ParamRole::FfnW3, layer, std);
  o.w2 = add(prefix + ".w2.weight", {d, ff}, ParamRole::FfnW2, layer, out_std);
  return o;
}

ParamLayout::ParamLayout(const ModelConfig& c) {
  const int d = c.d_model, hd = c.head_dim;
  const double std = c.init_std, out_std = c.init_std / std::sqrt(2.0 * c.n_layers);
  embed_ = add("embed.weight", {c.vocab_size, d}, ParamRole::Embedding, -1, std);
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "layers." + std::to_string(l);
    LayerOffsets lo;
    lo.attn_norm = add(p + ".attn_norm.weight", {d}, ParamRole::Norm, l, 0);
    lo.qkv =
        add(p + ".attn.q_proj.weight", {std::int64_t(c.n_heads) * hd, d}, ParamRole::AttnQ, l, std);
    add(p + ".attn.k_proj.weight", {std::int64_t(c.n_kv_heads) * hd, d}, ParamRole::AttnK, l, std);
    add(p + ".attn.v_proj.weight", {std::int64_t(c.n_kv_heads) * hd, d}, ParamRole::AttnV, l, std);
    lo.o_proj = add(p + ".attn.o_proj.weight", {d, std::int64_t(c.n_heads) * hd}, ParamRole::AttnO,
                    l, out_std);
    lo.ffn_norm = add(p + ".ffn_norm.weight", {d}, ParamRole::Norm, l, 0);
    lo.moe = is_moe_layer(c, l);
    if (!lo.moe) {
      lo.dense = add_swiglu(p + ".mlp", l, d, c.dense_ff, std, out_std);
    } else {
      const MoeConfig& m = c.moe;
      lo.router = add(p + ".moe.router.weight", {m.n_experts, d}, ParamRole::Router, l, std);
      for (int e = 0; e < m.n_experts; ++e)
        lo.experts.push_back(
            add_swiglu(p + ".moe.experts." + std::to_string(e), l, d, m.expert_ff, std, out_std));
      for (int s = 0; s < m.n_shared_experts; ++s)
        lo.shared.push_back(add_swiglu(p + ".moe.shared_experts." + std::to_string(s), l, d,
                                       m.shared_ff, std, out_std));
    }
    layers_.push_back(std::move(lo));
  }
  final_norm_ = add("norm.weight", {d}, ParamRole::Norm, -1, 0);
  lm_head_ = c.tie_embeddings
                 ? embed_
                 : add("lm_head.weight", {c.vocab_size, d}, ParamRole::LmHead, -1, std);
}

const ParamTensor& ParamLayout::find(const std::string& name) const {
  for (const auto& t : tensors_)
    if (t.name == name) return t;
  throw std::out_of_range("no parameter named '" + name + "'");
}

}  // namespace moetrain
