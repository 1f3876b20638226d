// AdaMuon (arXiv 2507.11005; ../shared/OPTIMIZERS.md §3, after the authors' adamuon.py) on the
// matrices this rank owns: Muon's momentum, Newton-Schulz of the sign of the update direction,
// then each element divided by the root of an EMA (decay optim.momentum) of its square, the
// result rescaled to an RMS of 0.2 and applied with decoupled weight decay.
#pragma once

#include "optim/newton_schulz.hpp"
#include "optim/update_rule.hpp"

namespace moetrain {

template <typename T>
class AdaMuon final : public MatrixOptimizer<T> {
 public:
  AdaMuon(const OptimConfig& o, Zero1Plan<T>& plan);

  void step(T* params, double lr, std::int64_t t, const double* gate, double* acc) override;
  std::vector<StateTensor<T>> state() override;
  int transformed_last_step() const override { return orthogonalised_; }

 private:
  const OptimConfig& o_;
  Zero1Plan<T>& plan_;
  Backend<T>& be_;
  std::vector<std::size_t> v_offsets_;  // per group (update_rule.hpp)
  DeviceBuffer<T, T> momentum_;         // [own elems], each matrix at its state offset
  DeviceBuffer<T, T> v_;                // [own elems], group by group: [matrices, A, B] each
  NewtonSchulz<T> ns_;
  int orthogonalised_ = 0;
};

extern template class AdaMuon<float>;
extern template class AdaMuon<double>;

}  // namespace moetrain
