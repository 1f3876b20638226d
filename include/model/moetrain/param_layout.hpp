// The parameter layout: every tensor of the model named (PyTorch style), shaped and placed in one
// contiguous buffer; the gradients use a twin buffer with the same offsets.
//
// Tensors that are used together sit next to each other so one GEMM covers them: q, k and v of a
// layer form one [(H + 2 Hkv) hd, d] block, and the w1 and w3 of each SwiGLU form one [2 ff, d]
// block. Each remains its own named tensor (checkpoint names map 1:1 to PyTorch).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "moetrain/config.hpp"

namespace moetrain {

enum class ParamRole {
  Embedding,
  Norm,
  AttnQ,
  AttnK,
  AttnV,
  AttnO,
  FfnW1,
  FfnW3,
  FfnW2,
  Router,
  LmHead
};

// Whether a role belongs to the Muon group (2D hidden weights) or the AdamW group.
bool is_hidden_matrix(ParamRole role);

struct ParamTensor {
  std::string name;
  std::vector<std::int64_t> shape;
  std::size_t offset = 0;
  std::size_t numel = 0;
  ParamRole role = ParamRole::Norm;
  int layer = -1;       // -1 for embed, final norm, lm_head
  double init_std = 0;  // 0: constant one (norm gains)
};

// The backward stage after which a tensor's gradient is final. Model's backward reports stage s
// (0 .. n_layers) once it has produced every gradient of that stage: 0 after the last layer (with
// the final norm and an untied lm_head, whose gradients the head wrote before), n_layers - 1 - l
// after layer l, n_layers after the embedding (a tied lm_head's gradient ends there too).
int grad_ready_stage(const ParamTensor& t, int n_layers);
// The stage backward reports after layer `layer` (-1: the embedding, which backward reaches last).
inline int backward_stage(int layer, int n_layers) {
  return n_layers - 1 - layer;
}

// Offsets of a SwiGLU block: w1 and w3 fused as [2 ff, d], then w2 [d, ff].
struct SwiGluOffsets {
  std::size_t w13 = 0, w2 = 0;
  int ff = 0;
};

struct LayerOffsets {
  std::size_t attn_norm = 0, qkv = 0, o_proj = 0, ffn_norm = 0;
  bool moe = false;
  SwiGluOffsets dense;                 // dense layers
  std::size_t router = 0;              // MoE layers
  std::vector<SwiGluOffsets> experts;  // MoE layers
  std::vector<SwiGluOffsets> shared;   // MoE layers with shared experts
};

class ParamLayout {
 public:
  explicit ParamLayout(const ModelConfig& cfg);

  const std::vector<ParamTensor>& tensors() const { return tensors_; }
  std::size_t total() const { return total_; }
  const ParamTensor& find(const std::string& name) const;  // throws std::out_of_range

  std::size_t embed() const { return embed_; }
  std::size_t final_norm() const { return final_norm_; }
  std::size_t lm_head() const { return lm_head_; }  // == embed() when tied
  const LayerOffsets& layer(int l) const { return layers_[std::size_t(l)]; }

 private:
  std::size_t add(std::string name, std::vector<std::int64_t> shape, ParamRole role, int layer,
                  double init_std);
  SwiGluOffsets add_swiglu(const std::string& prefix, int layer, int d, int ff, double std,
                           double out_std);

  std::vector<ParamTensor> tensors_;
  std::vector<LayerOffsets> layers_;
  std::size_t total_ = 0, embed_ = 0, final_norm_ = 0, lm_head_ = 0;
};

}  // namespace moetrain
