// Muon (docs/design.md §4) on the matrices this rank owns: momentum (Nesterov or plain), then the
// update orthogonalised by Newton-Schulz, batched over same-shape matrices, scaled and applied
// with decoupled weight decay.
#pragma once

#include "optim/update_rule.hpp"

namespace moetrain {

// The Newton-Schulz workspace of one group of `matrices` same-shape matrices: X and Y hold `ws`
// elements each, S and P `s` each; the owner allocates the largest group's (the memory
// estimate shares this).
struct MuonWorkspace {
  std::size_t ws = 0, s = 0;
};
MuonWorkspace muon_workspace(int rows, int cols, std::size_t matrices);

template <typename T>
class Muon final : public MatrixOptimizer<T> {
 public:
  Muon(const OptimConfig& o, Zero1Plan<T>& plan);

  void step(T* params, double lr, std::int64_t t, const double* gate, double* acc) override;
  std::vector<StateTensor<T>> state() override;
  int transformed_last_step() const override { return orthogonalised_; }

 private:
  // Momentum, Newton-Schulz and the update for `count` matrices of group g from index `first`;
  // *acc += the sum of squares of s * O over them.
  void batch(const MatrixGroup& g, std::size_t first, int count, T* params, double lr,
             const double* gate, double* acc);

  const OptimConfig& o_;
  Zero1Plan<T>& plan_;
  Backend<T>& be_;
  DeviceBuffer<T, T> momentum_;  // [own elems], each matrix at its slot
  // Newton-Schulz workspace for one batch of [A, B] matrices, m = min(A, B): X, Y [batch, A, B]
  // (ping-pong), S, P [batch, m, m].
  DeviceBuffer<T, T> ws_x_, ws_y_, ws_s_, ws_p_;
  int orthogonalised_ = 0;
};

extern template class Muon<float>;
extern template class Muon<double>;

}  // namespace moetrain
