#include "optim/adamw.hpp"

#include <algorithm>

namespace moetrain {

template <typename T>
AdamW<T>::AdamW(const OptimConfig& o, Zero1Plan<T>& plan)
    : o_(o), plan_(plan), m_(plan.backend(), plan.shard()), v_(plan.backend(), plan.shard()) {}

template <typename T>
void AdamW<T>::step(double lr, std::int64_t t, const double* gate, double* acc) {
  const std::size_t shard0 = plan_.shard_begin(), end = shard0 + plan_.shard();
  for (const AdamWEntry& e : plan_.adamw()) {
    const std::size_t lo = std::max(e.flat, shard0), hi = std::min(e.flat + e.numel, end);
    if (lo >= hi) continue;
    plan_.backend().adamw_update(plan_.flat_params() + lo, plan_.shard_grad() + (lo - shard0),
                                 m_.get() + (lo - shard0), v_.get() + (lo - shard0), hi - lo,
                                 lr * e.lr_scale, o_.beta1, o_.beta2, o_.eps, e.weight_decay, t,
                                 gate, acc);
  }
}

// The shard is a slice of the packed group, so each moment is one flat tensor.
template <typename T>
std::vector<StateTensor<T>> AdamW<T>::state() {
  const std::size_t n = plan_.shard();
  return {{"adamw.m", m_.get(), n, {std::int64_t(n)}}, {"adamw.v", v_.get(), n, {std::int64_t(n)}}};
}

template class AdamW<float>;
template class AdamW<double>;

}  // namespace moetrain
