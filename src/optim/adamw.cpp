#include "optim/adamw.hpp"

#include <algorithm>

namespace moetrain {

template <typename T>
AdamW<T>::AdamW(const OptimConfig& o, Zero1Plan<T>& plan)
    : o_(o), plan_(plan), m_(plan.backend(), plan.shard()), v_(plan.backend(), plan.shard()) {}

template <typename T>
void AdamW<T>::step(double lr, std::int64_t t, const double* gate, double* acc) {
  // This rank's piece of each bucket is a slice of its packed tensors; each tensor's part of it is
  // updated with the tensor's learning rate and weight decay.
  for (const GradBucket& b : plan_.buckets()) {
    const std::size_t begin = plan_.own_piece(b), end = begin + b.piece;
    for (std::size_t i : b.entries) {
      const AdamWEntry& e = plan_.adamw()[i];
      const std::size_t lo = std::max(e.flat, begin), hi = std::min(e.flat + e.numel, end);
      if (lo >= hi) continue;
      const std::size_t at = b.shard_offset + (lo - begin);
      plan_.backend().adamw_update(plan_.flat_params() + lo, plan_.shard_grad() + at, m_.get() + at,
                                   v_.get() + at, hi - lo, lr * e.lr_scale, o_.beta1, o_.beta2,
                                   o_.eps, e.weight_decay, t, gate, acc);
    }
  }
}

// The shard is this rank's pieces of the packed group, so each moment is one flat tensor.
template <typename T>
std::vector<StateTensor<T>> AdamW<T>::state() {
  const std::size_t n = plan_.shard();
  return {{"adamw.m", m_.get(), n, {std::int64_t(n)}}, {"adamw.v", v_.get(), n, {std::int64_t(n)}}};
}

template class AdamW<float>;
template class AdamW<double>;

}  // namespace moetrain
