#include "model/moe/moe_layer.hpp"

namespace moetrain {

template <typename T>
MoeLayer<T>::MoeLayer(const ModelConfig& cfg, const LayerOffsets& w, Backend<T>& be, int tokens)
    : cfg_(cfg),
      w_(w),
      be_(be),
      tokens_(tokens),
      router_(cfg, w.router, be),
      dispatcher_(be, tokens, cfg.d_model, cfg.moe.n_experts, cfg.moe.top_k),
      experts_(be, w.experts, tokens * cfg.moe.top_k, cfg.d_model),
      shared_(w.shared.size()) {}

template <typename T>
void MoeLayer<T>::plan_acts(ArenaPlan& plan, const ModelConfig& cfg, std::size_t N, Storage act,
                            MoeLayer* layer) {
  const MoeConfig& m = cfg.moe;
  const std::size_t rows = checked_mul(N, std::size_t(m.top_k));
  if (layer) {
    layer->router_.plan(plan, N);
    layer->dispatcher_.plan(plan);
    layer->experts_.plan(plan);
    for (FfnActs& s : layer->shared_) s.plan(plan, N, std::size_t(m.shared_ff), act);
    return;
  }
  typename Router<T>::Acts r;
  typename Dispatcher<T>::Acts g;
  typename Experts<T>::Acts x;
  FfnActs s;
  Router<T>::plan_acts(plan, r, m, N);
  Dispatcher<T>::plan_acts(plan, g, rows, std::size_t(m.n_experts), std::size_t(cfg.d_model), act);
  Experts<T>::plan_acts(plan, x, rows, std::size_t(m.expert_ff), std::size_t(cfg.d_model), act);
  for (int i = 0; i < m.n_shared_experts; ++i) s.plan(plan, N, std::size_t(m.shared_ff), act);
}

template <typename T>
void MoeLayer<T>::plan(ArenaPlan& plan) {
  plan_acts(plan, cfg_, std::size_t(tokens_), be_.activation_storage(), this);
}

template <typename T>
void MoeLayer<T>::forward(const T* params, CDevPtr x, DevPtr out, DevPtr tmp) {
  const int d = cfg_.d_model;
  router_.forward(params, x, tokens_);
  const typename Router<T>::Acts& r = router_.acts();
  dispatcher_.dispatch(x, r.topk, r.counts);
  experts_.forward(params, dispatcher_.acts().xg, dispatcher_.acts().offsets);
  dispatcher_.combine(out, experts_.acts().y, r.gates, tmp);
  for (std::size_t s = 0; s < shared_.size(); ++s)
    ffn_forward(be_, params, w_.shared[s], d, x, tokens_, shared_[s], out);
}

template <typename T>
void MoeLayer<T>::backward(const T* params, T* grads, CDevPtr x, CDevPtr dout, DevPtr dx,
                           double grad_scale, const Scratch& s) {
  const int d = cfg_.d_model;
  const typename Dispatcher<T>::Acts& g = dispatcher_.acts();
  dispatcher_.combine_backward(s.dyg, s.dgates, dout, experts_.acts().y, router_.acts().gates);
  experts_.backward(params, grads, g.xg, g.offsets, s.dyg, s.dxg, s.ffn);
  router_.backward(params, grads, x, s.dgates, s.dlogits, dx, tokens_, grad_scale);
  dispatcher_.dispatch_backward(dx, s.dxg);
  for (std::size_t i = 0; i < shared_.size(); ++i)
    ffn_backward(be_, params, grads, w_.shared[i], d, x, tokens_, shared_[i], dout, dx, true,
                 s.ffn);
}

template class MoeLayer<float>;
template class MoeLayer<double>;

}  // namespace moetrain
