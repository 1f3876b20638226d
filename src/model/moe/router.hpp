// The MoE router of one layer (docs/design.md §3): logits = x W_r^T, then softmax_topk or
// sigmoid_bias routing, forward and backward side by side. The router owns its layer's expert bias
// (sigmoid_bias steers selection with it; it is a buffer, not a parameter; its host copy is the
// authority, uploaded after each change), the bias update and the bias's checkpoint state.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/arena.hpp"
#include "moetrain/backend.hpp"
#include "moetrain/config.hpp"

namespace moetrain {

template <typename T>
class Router {
 public:
  // What one forward keeps (N tokens, E experts, k per token).
  struct Acts {
    T* logits = nullptr;             // [N, E]  x W_r^T
    T* scores = nullptr;             // [N, E]  softmax probabilities or sigmoid scores
    T* gates = nullptr;              // [N, k]  routing weights of the chosen experts
    T* stats = nullptr;              // [3]     L_aux, L_z, mean router entropy
    std::int32_t* topk = nullptr;    // [N, k]  chosen expert ids
    std::int32_t* counts = nullptr;  // [E]     assignments per expert
  };
  // The arena requests of one router's activations (the model's plan and the memory estimate).
  static void plan_acts(ArenaPlan& plan, Acts& acts, const MoeConfig& moe, std::size_t tokens);

  // `weight`: offset of W_r [E, d] in the parameter buffer.
  Router(const ModelConfig& cfg, std::size_t weight, Backend<T>& be);
  Router(const Router&) = delete;
  Router& operator=(const Router&) = delete;

  void plan(ArenaPlan& plan, std::size_t tokens);
  const Acts& acts() const { return acts_; }

  void forward(const T* params, CDevPtr x, int tokens);
  // dx[N, d] = d/dx of the routing (overwritten) from the gate gradients dgates[N, k] (which carry
  // the loss's grad_scale) and grad_scale * (aux_coef L_aux + z_coef L_z); W_r's gradient += .
  void backward(const T* params, T* grads, CDevPtr x, const T* dgates, T* dlogits, DevPtr dx,
                int tokens, double grad_scale);

  // sigmoid_bias load balancing (DeepSeek-V3), after each optimizer step with the loads summed
  // over the global batch: b_e += rate * sign(mean load - load_e).
  void update_bias(const std::vector<std::int64_t>& global_loads, double rate);

  // The bias as checkpoint state, and back (errors name `source`).
  std::vector<double> bias_state() const;
  void load_bias_state(const std::vector<double>& bias, const std::string& source);

 private:
  RouterShape shape(int tokens) const;

  const ModelConfig& cfg_;
  std::size_t weight_;
  Backend<T>& be_;
  DeviceBuffer<T, T> bias_;  // [E]
  Acts acts_;
  std::vector<T> bias_host_;  // [E], what bias_ holds
};

extern template class Router<float>;
extern template class Router<double>;

}  // namespace moetrain
