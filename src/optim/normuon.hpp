// NorMuon (arXiv 2510.05491; ../shared/OPTIMIZERS.md §2, after the reference code normuon.py) on
// the matrices this rank owns: Muon's momentum and Newton-Schulz, then each row (output neuron)
// of the orthogonalised O divided by the root of an EMA of its mean square, the result rescaled
// to O's Frobenius norm times sqrt(max(1, A/B)) (optim.normuon_scale original), or to an RMS of
// 0.2 (match_rms_adamw, the paper's), and applied with decoupled weight decay.
#pragma once

#include "optim/newton_schulz.hpp"
#include "optim/update_rule.hpp"

namespace moetrain {

template <typename T>
class NorMuon final : public MatrixOptimizer<T> {
 public:
  NorMuon(const OptimConfig& o, Zero1Plan<T>& plan);

  void step(T* params, double lr, std::int64_t t, const double* gate, double* acc) override;
  std::vector<StateTensor<T>> state() override;
  int transformed_last_step() const override { return orthogonalised_; }

  // The reference's epsilon, in the row normalisation and the Frobenius rescale.
  static constexpr double kEps = 1e-10;

 private:
  const OptimConfig& o_;
  Zero1Plan<T>& plan_;
  Backend<T>& be_;
  std::vector<std::size_t> v_offsets_;  // per group (update_rule.hpp)
  DeviceBuffer<T, T> momentum_;         // [own elems], each matrix at its state offset
  DeviceBuffer<T, T> v_;                // [sum of rows], group by group: [matrices, A] each
  NewtonSchulz<T> ns_;
  int orthogonalised_ = 0;
};

extern template class NorMuon<float>;
extern template class NorMuon<double>;

}  // namespace moetrain
