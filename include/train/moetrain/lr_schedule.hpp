// Learning-rate schedules (optim.schedule), all with a linear warm-up over optim.warmup_steps:
//   cosine   : then cosine decay from lr to lr * min_lr_ratio at the last step;
//   wsd      : then constant (stable) until the last decay_fraction of the steps, then linear
//              decay to lr * min_lr_ratio (warmup-stable-decay);
//   constant : then constant.
#pragma once

#include "moetrain/config.hpp"

namespace moetrain {

// Learning rate of step `step` (0-based) of a run of `total` steps.
double lr_at(const OptimConfig& o, int step, int total);

}  // namespace moetrain
