// AdamW (docs/design.md §4) on this rank's shard of the packed AdamW group: bias-corrected moments,
// decoupled weight decay, each tensor with its group's lr scale and decay.
#pragma once

#include "optim/update_rule.hpp"

namespace moetrain {

template <typename T>
class AdamW {
 public:
  AdamW(const OptimConfig& o, Zero1Plan<T>& plan);

  // Updates the shard of plan.flat_params() from plan.shard_grad() unless the step's `gate` says
  // skip; *acc += the sum of squares of m_hat / (sqrt(v_hat) + eps) over the shard (device).
  void step(double lr, std::int64_t t, const double* gate, double* acc);
  std::vector<StateTensor<T>> state();
  std::size_t state_elems() const { return 2 * plan_.shard(); }

 private:
  const OptimConfig& o_;
  Zero1Plan<T>& plan_;
  DeviceBuffer<T, T> m_, v_;  // [shard]
};

extern template class AdamW<float>;
extern template class AdamW<double>;

}  // namespace moetrain
