#include "moetrain/lr_schedule.hpp"

#include <algorithm>
#include <cmath>

namespace moetrain {

double lr_at(const OptimConfig& o, int step, int total) {
  if (step < o.warmup_steps) return o.lr * double(step + 1) / double(o.warmup_steps);
  const double floor = o.lr * o.min_lr_ratio;
  if (o.schedule == LrSchedule::Constant) return o.lr;
  if (o.schedule == LrSchedule::Wsd) {
    const int decay_steps = int(std::lround(o.decay_fraction * total));
    const int decay_start = std::max(o.warmup_steps, total - decay_steps);
    if (step < decay_start) return o.lr;
    const double p = double(step - decay_start + 1) / double(std::max(1, total - decay_start));
    return o.lr + (floor - o.lr) * std::min(1.0, p);
  }
  // cosine
  const int span = std::max(1, total - 1 - o.warmup_steps);
  const double p = std::min(1.0, double(step - o.warmup_steps) / double(span));
  return floor + (o.lr - floor) * 0.5 * (1.0 + std::cos(M_PI * p));
}

}  // namespace moetrain
