// Muon (docs/design.md §4) on the matrices this rank owns: momentum (Nesterov or plain), then the
// update orthogonalised by Newton-Schulz (optim/newton_schulz.hpp), scaled and applied with
// decoupled weight decay.
#pragma once

#include <algorithm>
#include <vector>

#include "optim/newton_schulz.hpp"
#include "optim/update_rule.hpp"

namespace moetrain {

// The step shared by the optimizers that orthogonalise (Muon, NorMuon, AdaMuon), over every
// group this rank owns in batches of at most kMaxNewtonSchulzBatch: the momentum of each matrix
// (M at its slot of `momentum`) and its direction U into the Newton-Schulz input, sign(U) when
// `sign_input`, Newton-Schulz with `eps_scale` (NewtonSchulz::run), then
// `post(group index, group, first, count, O)`, which may rework the batch's O [count, A, B] in
// place and returns the scale s of W -= lr (s O + wd W). Returns the matrices orthogonalised.
template <typename T, typename Post>
int orthogonalised_step(const OptimConfig& o, Zero1Plan<T>& plan, NewtonSchulz<T>& ns, T* momentum,
                        T* params, double lr, const double* gate, double* acc, bool sign_input,
                        double eps_scale, Post post) {
  Backend<T>& be = plan.backend();
  const std::vector<MatrixGroup>& groups = plan.own_groups();
  int done = 0;
  for (std::size_t gi = 0; gi < groups.size(); ++gi) {
    const MatrixGroup& g = groups[gi];
    const std::size_t elems = std::size_t(g.rows) * std::size_t(g.cols);
    for (std::size_t first = 0; first < g.mats.size(); first += kMaxNewtonSchulzBatch) {
      const int count = int(std::min<std::size_t>(kMaxNewtonSchulzBatch, g.mats.size() - first));
      for (int i = 0; i < count; ++i) {
        const OwnedMatrix& mt = plan.matrices()[g.mats[first + std::size_t(i)]];
        be.muon_momentum(momentum + mt.state, ns.input() + std::size_t(i) * elems,
                         plan.matrix_grad(mt), elems, o.momentum, o.nesterov, gate);
      }
      if (sign_input) be.sign_inplace(ns.input(), std::size_t(count) * elems);
      T* O = ns.run(g.rows, g.cols, count, eps_scale);
      const double s = post(gi, g, first, count, O);
      for (int i = 0; i < count; ++i)
        be.muon_update(params + plan.matrices()[g.mats[first + std::size_t(i)]].offset,
                       O + std::size_t(i) * elems, elems, lr, s, o.muon_group.weight_decay, gate,
                       acc);
      done += count;
    }
  }
  return done;
}

template <typename T>
class Muon final : public MatrixOptimizer<T> {
 public:
  Muon(const OptimConfig& o, Zero1Plan<T>& plan);

  void step(T* params, double lr, std::int64_t t, const double* gate, double* acc) override;
  std::vector<StateTensor<T>> state() override;
  int transformed_last_step() const override { return orthogonalised_; }

 private:
  const OptimConfig& o_;
  Zero1Plan<T>& plan_;
  Backend<T>& be_;
  DeviceBuffer<T, T> momentum_;  // [own elems], each matrix at its state offset
  NewtonSchulz<T> ns_;
  int orthogonalised_ = 0;
};

extern template class Muon<float>;
extern template class Muon<double>;

}  // namespace moetrain
