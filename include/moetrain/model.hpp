// The MoE transformer (DESIGN §3): parameters in one buffer (see ParamLayout), activations in one
// planned arena, forward and backward as sequences of Backend ops.
//
//   x = embed[tokens]
//   per layer: x += Attn(RMSNorm(x));  x += FFN(RMSNorm(x))   (dense SwiGLU, or MoE)
//   logits = lm_head(RMSNorm(x));  objective = CE + sum_l aux_coef L_aux + sum_l z_coef L_z
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "moetrain/backend.hpp"
#include "moetrain/config.hpp"
#include "moetrain/param_layout.hpp"

namespace moetrain {

// What one forward pass reports. Per-layer vectors have n_layers entries; MoE fields of dense
// layers are zero / empty.
struct ForwardStats {
  double objective = 0;  // ce + sum aux_coef * aux + sum z_coef * z
  double ce = 0;         // mean cross-entropy over the valid (non-negative) targets
  double ce_sum = 0;     // their sum, and their number (for averaging across batches/ranks)
  std::int64_t ce_tokens = 0;
  std::vector<double> aux, z, entropy;          // per layer: L_aux, L_z, mean router entropy
  std::vector<std::vector<std::int32_t>> load;  // per layer: assignments per expert
  std::vector<std::vector<double>> smax;        // per layer, per query head: max q.k/sqrt(hd)
};

template <typename T>
class Model {
 public:
  // Plans parameters and the activation arena for micro-batches of `batch` sequences of
  // cfg.seq_len tokens.
  Model(const ModelConfig& cfg, Backend<T>& backend, int batch);
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
  // Per-layer expert bias of the sigmoid_bias router ([n_layers][n_experts], a buffer, not a
  // parameter: it steers selection only).
  T* expert_bias() { return expert_bias_; }

  // The sigmoid_bias router's load balancing (DeepSeek-V3), after each optimizer step:
  // b_e += rate * sign(mean load - load_e), per MoE layer, loads counted over the global batch.
  void update_expert_bias(const std::vector<std::vector<std::int64_t>>& loads, double rate);

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
  struct LayerActs;
  void run_forward(const std::int32_t* tokens, const std::int32_t* targets, double ce_grad_scale);
  void run_backward(double grad_scale);
  void swiglu_forward(const SwiGluOffsets& w, const T* x, int rows, T* h, T* act, T* out);
  void swiglu_backward(const SwiGluOffsets& w, const T* x, int rows, const T* h, const T* act,
                       const T* dout, T* dx, bool accumulate_dx);
  void collect_stats(double ce_sum, std::int64_t ce_tokens);
  static std::int64_t count_valid(const std::int32_t* targets, int n);

  ModelConfig cfg_;
  Backend<T>& be_;
  int batch_;
  ParamLayout layout_;
  AttentionShape att_;
  T* params_ = nullptr;
  T* grads_ = nullptr;
  T* expert_bias_ = nullptr;
  void* arena_ = nullptr;

  // Activations (arena).
  std::int32_t *tokens_ = nullptr, *targets_ = nullptr;
  std::vector<T*> resid_;  // n_layers + 1 residual streams [N, d]
  std::vector<LayerActs> acts_;
  T *final_norm_ = nullptr, *final_rstd_ = nullptr, *logits_ = nullptr, *losses_ = nullptr;
  T *rope_cos_ = nullptr, *rope_sin_ = nullptr, *tmp_ = nullptr;
  // Backward scratch (arena), reused by every layer.
  T *dres_ = nullptr, *dnorm_ = nullptr, *datt_ = nullptr, *dqkv_ = nullptr, *dh_ = nullptr,
    *dact_ = nullptr, *dyg_ = nullptr, *dxg_ = nullptr, *dgates_ = nullptr, *drouter_ = nullptr;

  ForwardStats stats_;
  std::vector<T> host_losses_;
};

extern template class Model<float>;
extern template class Model<double>;

}  // namespace moetrain
