#include "model/moe/router.hpp"

#include <stdexcept>

#include "model/linear.hpp"

namespace moetrain {

template <typename T>
Router<T>::Router(const ModelConfig& cfg, std::size_t weight, Backend<T>& be)
    : cfg_(cfg),
      weight_(weight),
      be_(be),
      bias_(be, std::size_t(cfg.moe.n_experts)),
      bias_host_(std::size_t(cfg.moe.n_experts), T(0)) {}

template <typename T>
void Router<T>::plan_acts(ArenaPlan& plan, Acts& a, const MoeConfig& moe, std::size_t N) {
  const std::size_t E = std::size_t(moe.n_experts), K = std::size_t(moe.top_k);
  plan.request(a.logits, checked_mul(N, E));
  plan.request(a.scores, checked_mul(N, E));
  plan.request(a.gates, checked_mul(N, K));
  plan.request(a.stats, 3);
  plan.request(a.topk, checked_mul(N, K));
  plan.request(a.counts, E);
}

template <typename T>
void Router<T>::plan(ArenaPlan& plan, std::size_t N) {
  plan_acts(plan, acts_, cfg_.moe, N);
}

template <typename T>
RouterShape Router<T>::shape(int tokens) const {
  return RouterShape{tokens, cfg_.moe.n_experts, cfg_.moe.top_k, cfg_.moe.router,
                     cfg_.moe.route_scale};
}

template <typename T>
void Router<T>::forward(const T* params, CDevPtr x, int N) {
  const Acts& a = acts_;
  linear_forward(be_, a.logits, x, params + weight_, N, cfg_.d_model, cfg_.moe.n_experts);
  be_.router_forward(a.scores, a.topk, a.gates, a.counts, a.stats, a.logits, bias_.get(), shape(N));
}

template <typename T>
void Router<T>::backward(const T* params, T* grads, CDevPtr x, const T* dgates, T* dlogits,
                         DevPtr dx, int N, double grad_scale) {
  const Acts& a = acts_;
  be_.router_backward(dlogits, dgates, a.logits, a.scores, a.topk, a.gates, a.counts, shape(N),
                      cfg_.moe.aux_loss_coef, cfg_.moe.z_loss_coef, grad_scale);
  linear_backward(be_, dx, grads + weight_, dlogits, x, params + weight_, N, cfg_.d_model,
                  cfg_.moe.n_experts, false);
}

// The host copy is the bias's authority: an update or a load changes it and uploads it (an
// asynchronous upload), so nothing here waits for the device.
template <typename T>
void Router<T>::update_bias(const std::vector<std::int64_t>& load, double rate) {
  const int E = cfg_.moe.n_experts;
  if (load.size() != std::size_t(E))
    throw std::invalid_argument("Router::update_bias: " + std::to_string(load.size()) +
                                " loads, expected " + std::to_string(E));
  double mean = 0;
  for (auto c : load) mean += double(c);
  mean /= E;
  for (int e = 0; e < E; ++e) {
    const double diff = mean - double(load[std::size_t(e)]);
    const double sign = diff > 0 ? 1.0 : (diff < 0 ? -1.0 : 0.0);
    bias_host_[std::size_t(e)] += T(rate * sign);
  }
  be_.upload(bias_.get(), bias_host_.data(), bias_host_.size() * sizeof(T));
}

template <typename T>
std::vector<double> Router<T>::bias_state() const {
  return {bias_host_.begin(), bias_host_.end()};
}

template <typename T>
void Router<T>::load_bias_state(const std::vector<double>& bias, const std::string& source) {
  if (bias.size() != std::size_t(cfg_.moe.n_experts))
    throw std::runtime_error(source + ": expert_bias rows must have " +
                             std::to_string(cfg_.moe.n_experts) + " entries");
  bias_host_.assign(bias.begin(), bias.end());
  be_.upload(bias_.get(), bias_host_.data(), bias_host_.size() * sizeof(T));
}

template class Router<float>;
template class Router<double>;

}  // namespace moetrain
