// The MoE transformer (docs/design.md §3): parameters in one buffer (see ParamLayout), activations
// in one planned arena, forward and backward as lists of layer steps (src/model/: the attention
// block and head here, the SwiGLU FFN in ffn.cpp, the MoE layer's router, dispatcher and experts
// in moe/).
//
//   x = embed[tokens]
//   per layer: x += Attn(RMSNorm(x));  x += FFN(RMSNorm(x))   (dense SwiGLU, or MoE)
//   logits = lm_head(RMSNorm(x));  objective = CE + sum_l aux_coef L_aux + sum_l z_coef L_z
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moetrain/backend.hpp"
#include "moetrain/config.hpp"
#include "moetrain/param_layout.hpp"

namespace moetrain {
class ArenaPlan;
}

namespace moetrain {

// What one forward pass reports. Per-layer vectors have n_layers entries; MoE fields of dense
// layers are zero / empty.
struct ForwardStats {
  double objective = 0;  // ce + sum aux_coef * aux + sum z_coef * z
  double ce = 0;         // mean cross-entropy over the valid (non-negative) targets
  double ce_sum = 0;     // their sum, and their number (for averaging across batches/ranks)
  std::int64_t ce_tokens = 0;
  std::vector<double> aux, z, entropy;          // per layer: L_aux, L_z, mean router entropy
  std::vector<std::vector<std::int32_t>> load;  // per layer: assignments per expert (this batch)
  std::vector<std::vector<double>> smax;        // per layer, per query head: max q.k/sqrt(hd)
};

template <typename T>
class Model {
 public:
  // Plans parameters and the activation arena for micro-batches of `batch` sequences of
  // cfg.seq_len tokens.
  Model(const ModelConfig& cfg, Backend<T>& backend, int batch);
  // The bytes of the activation arena such a model allocates (and its routers' expert biases),
  // computed by the same requests without allocating (attention_saved_elems: the backend's query
  // for this shape). Throws std::overflow_error when a size does not fit in 64 bits.
  static std::size_t activation_bytes(const ModelConfig& cfg, std::size_t batch,
                                      std::size_t attention_saved_elems);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const { return cfg_; }
  const ParamLayout& layout() const { return layout_; }
  int batch() const { return batch_; }
  int tokens() const { return batch_ * cfg_.seq_len; }
  Backend<T>& backend() { return be_; }

  T* params() { return params_; }
  T* grads() { return grads_; }

  // The routers' expert loads counted by forward_backward since the last take, per layer
  // ([n_layers][n_experts]; empty for dense layers), and a fresh count.
  std::vector<std::vector<std::int64_t>> take_router_loads();
  // The sigmoid_bias routers' bias update with the loads summed over the global batch (see
  // Router::update_bias); layers with empty loads are left as they are.
  void update_router_biases(const std::vector<std::vector<std::int64_t>>& loads, double rate);
  // The routers' expert biases as checkpoint state, [n_layers][n_experts] (zeros for dense
  // layers), and back (errors name `source`).
  std::vector<std::vector<double>> expert_bias_state() const;
  void load_expert_bias_state(const std::vector<std::vector<double>>& bias,
                              const std::string& source);

  // Normal(0, std) weights per ParamLayout, gains 1; deterministic in `seed`.
  void init_weights(std::uint64_t seed);
  void zero_grads();

  // Forward only (evaluation). tokens, targets: host arrays of tokens() ids; a negative target
  // is padding and carries no loss.
  const ForwardStats& forward(const std::int32_t* tokens, const std::int32_t* targets);
  // Forward, then backward of grad_scale * objective, accumulated into grads().
  const ForwardStats& forward_backward(const std::int32_t* tokens, const std::int32_t* targets,
                                       double grad_scale);
  // Forward to logits only ([tokens(), vocab] device buffer), for sampling.
  const T* forward_logits(const std::int32_t* tokens);

  const ForwardStats& stats() const { return stats_; }

 private:
  struct Layer;
  static void plan_arena(ArenaPlan& plan, const ModelConfig& cfg, std::size_t batch,
                         std::size_t att_saved, Model* model);
  void run_forward(const std::int32_t* tokens, const std::int32_t* targets, double ce_grad_scale);
  void run_backward(double grad_scale);
  void attention_forward(Layer& l, const T* x);
  void attention_backward(Layer& l, const T* x);
  void collect_stats(double ce_sum, std::int64_t ce_tokens);
  static std::int64_t count_valid(const std::int32_t* targets, int n);

  ModelConfig cfg_;
  Backend<T>& be_;
  int batch_;
  ParamLayout layout_;
  AttentionShape att_;
  T* params_ = nullptr;
  T* grads_ = nullptr;
  void* arena_ = nullptr;
  std::vector<std::unique_ptr<Layer>> layers_;

  // Activations in the arena (N = batch * seq tokens, d = d_model, V = vocab).
  std::int32_t* tokens_ = nullptr;   // [N]
  std::int32_t* targets_ = nullptr;  // [N]
  std::vector<T*> resid_;            // n_layers + 1 residual streams, each [N, d]
  T* final_norm_ = nullptr;          // [N, d]
  T* final_rstd_ = nullptr;          // [N]
  T* logits_ = nullptr;              // [N, V]; dlogits after a training forward
  T* losses_ = nullptr;              // [N]
  T* rope_cos_ = nullptr;            // [seq, head_dim / 2]
  T* rope_sin_ = nullptr;            // [seq, head_dim / 2]
  T* tmp_ = nullptr;                 // [N, d]  the MoE combine's scratch
  // Backward scratch in the arena, reused by every layer.
  T* dres_ = nullptr;   // [N, d]  gradient of the residual stream
  T* dnorm_ = nullptr;  // [N, d]  gradient of a norm's output
  T* datt_ = nullptr;   // [N, n_heads * head_dim]
  T* dqkv_ = nullptr;   // [N, (n_heads + 2 n_kv_heads) * head_dim]
  struct Scratch;       // the FFN and MoE blocks' backward scratch (model.cpp)
  std::unique_ptr<Scratch> scratch_;

  ForwardStats stats_;
  std::vector<T> host_losses_;
};

extern template class Model<float>;
extern template class Model<double>;

}  // namespace moetrain
