// The optimizer's regions of the step's stats block (moetrain/device_stats.hpp), reserved in one
// place for the optimizer and its memory estimate: this rank's [gradient sum of squares, loss
// sums...], every rank's (all-gathered, in rank order), the verdict (StepGate), the update sums
// (AdamW's, the matrix optimizer's, QK-clip's clipped heads), and Optimizer::step's uploaded
// S_max [n_layers][n_heads] (QK-clip only).
#pragma once

#include <algorithm>
#include <cstddef>

#include "moetrain/config.hpp"
#include "moetrain/device_stats.hpp"

namespace moetrain {

template <typename T>
struct OptimizerStatsRegions {
  typename DeviceStats<T>::template Region<double> send, gathered, gate, sums;
  typename DeviceStats<T>::template Region<T> smax_in;
};

template <typename T>
OptimizerStatsRegions<T> reserve_optimizer_stats(DeviceStats<T>& stats, const Config& cfg,
                                                 int world) {
  const std::size_t per_rank = 1 + std::size_t(std::max(cfg.train.grad_accum, 1));
  OptimizerStatsRegions<T> r;
  r.send = stats.template reserve<double>(per_rank);
  r.gathered = stats.template reserve<double>(per_rank * std::size_t(world));
  r.gate = stats.template reserve<double>(StepGate::kSize);
  r.sums = stats.template reserve<double>(3);
  if (qk_clip_enabled(cfg.optim))
    r.smax_in =
        stats.template reserve<T>(std::size_t(cfg.model.n_layers) * std::size_t(cfg.model.n_heads));
  return r;
}

}  // namespace moetrain
