// One MoE feed-forward block (docs/design.md §3), out += sum_j gate_j * Expert_j(x) + shared(x):
// the router picks k experts per token, the dispatcher groups the tokens by expert, the experts
// run on their rows, the dispatcher combines their outputs with the gates; shared experts (dense
// SwiGLU blocks) see every token. Forward and backward side by side.
#pragma once

#include <memory>
#include <vector>

#include "model/ffn.hpp"
#include "model/moe/dispatcher.hpp"
#include "model/moe/experts.hpp"
#include "model/moe/router.hpp"

namespace moetrain {

template <typename T>
class MoeLayer {
 public:
  // Backward scratch shared by the MoE layers (the model's arena).
  struct Scratch {
    DevPtr dyg;            // [N*k, d]
    DevPtr dxg;            // [N*k, d]
    T* dgates = nullptr;   // [N, k]
    T* dlogits = nullptr;  // [N, E]
    FfnScratch ffn;        // [N*k, 2 ff] and [N*k, ff] at least
  };

  // The arena requests of one MoE layer of `tokens` tokens, bound to the parts' buffers (the
  // model's plan), or, with every part null, on a dry plan (the memory estimate).
  static void plan_acts(ArenaPlan& plan, const ModelConfig& cfg, std::size_t tokens, Storage s,
                        MoeLayer* layer);

  MoeLayer(const ModelConfig& cfg, const LayerOffsets& w, Backend<T>& be, int tokens);
  void plan(ArenaPlan& plan);

  // out[N, d] += MoE(x[N, d]);  tmp: [N, d] scratch
  void forward(const T* params, CDevPtr x, DevPtr out, DevPtr tmp);
  // dx[N, d] = d/dx (overwritten) from dout[N, d]; weight gradients += into grads.
  void backward(const T* params, T* grads, CDevPtr x, CDevPtr dout, DevPtr dx, double grad_scale,
                const Scratch& s);

  Router<T>& router() { return router_; }
  const Router<T>& router() const { return router_; }

 private:
  const ModelConfig& cfg_;
  const LayerOffsets& w_;
  Backend<T>& be_;
  int tokens_;
  Router<T> router_;
  Dispatcher<T> dispatcher_;
  Experts<T> experts_;
  std::vector<FfnActs> shared_;
};

extern template class MoeLayer<float>;
extern template class MoeLayer<double>;

}  // namespace moetrain
