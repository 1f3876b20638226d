// Muon (docs/design.md §4) on the matrices this rank owns: momentum (Nesterov or plain), then the
// update orthogonalised by Newton-Schulz (optim/newton_schulz.hpp), scaled and applied with
// decoupled weight decay.
#pragma once

#include "optim/newton_schulz.hpp"
#include "optim/update_rule.hpp"

namespace moetrain {

// Momentum per matrix (M at its slot of `momentum`) and the update direction U of `count`
// matrices of group g from index `first`, contiguous into `out` (Muon, NorMuon, AdaMuon).
template <typename T>
void momentum_directions(const OptimConfig& o, Zero1Plan<T>& plan, T* momentum,
                         const MatrixGroup& g, std::size_t first, int count, T* out,
                         const double* gate);

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
  DeviceBuffer<T, T> momentum_;  // [own elems], each matrix at its slot
  NewtonSchulz<T> ns_;
  int orthogonalised_ = 0;
};

extern template class Muon<float>;
extern template class Muon<double>;

}  // namespace moetrain
