// The optimizer step (docs/design.md §4, §5) over the model's flat parameter buffer, by optim.name:
//   adamw    : every parameter with AdamW;
//   muon     : the matrix group (2D hidden weights: q/k/v/o, dense, expert and shared-expert
//              w1/w2/w3, each matrix orthogonalised on its own) with Muon; the rest (embeddings,
//              lm_head, norm gains, routers) with AdamW;
//   muonclip : muon, then per-head QK-clip from the step's recorded S_max.
//   normuon, adamuon, soap : those matrix optimizers on the matrix group, AdamW on the rest
//              (src/optim/normuon.cpp, adamuon.cpp, soap.cpp);
// and with optim.qk_clip any of them is followed by QK-clip.
// Global gradient-norm clipping happens first, over all parameters. The work is split over the
// ranks by ZeRO-1 (src/optim/zero1.hpp); the update rules are src/optim/adamw.cpp, the matrix
// optimizers' files and qk_clip.cpp.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "moetrain/backend.hpp"
#include "moetrain/communicator.hpp"
#include "moetrain/config.hpp"
#include "moetrain/device_stats.hpp"
#include "moetrain/param_layout.hpp"
#include "moetrain/safetensors.hpp"

namespace moetrain {

// Training diverged: a non-finite loss or gradient norm. Thrown before any parameter is updated.
class NonFiniteError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct OptimizerStats {
  double grad_norm = 0;         // global L2 norm before clipping
  double update_rms_muon = 0;   // RMS of s*O over the matrix group (0 without one)
  double update_rms_adamw = 0;  // RMS of m_hat / (sqrt(v_hat) + eps) over the AdamW group
  int clipped_heads = 0;        // query heads whose S_max exceeded tau (muonclip)
  // A gradient norm or a gated loss was not finite: nothing was updated, and the step count is
  // as before the step.
  bool skipped = false;
};

// The NonFiniteError message of a skipped step (`step`: the optimizer step it would have been).
std::string skipped_step_message(const OptimizerStats& st, std::int64_t step);

// What a step reads on the device besides parameters and gradients (docs/design.md §4.7, §4.8).
template <typename T>
struct StepInputs {
  // S_max of this rank's micro-batches, [smax_slots][n_layers][n_heads], for QK-clip: reduced
  // (max) over the ranks here, in place.
  T* smax = nullptr;
  int smax_slots = 0;
  // This rank's loss sums [n_losses] (at most train.grad_accum): a non-finite one on any rank
  // skips the step on every rank.
  const double* losses = nullptr;
  int n_losses = 0;
};

template <typename T>
class Optimizer {
 public:
  // Data parallel with ZeRO-1 over `comm`; nullptr: a world of one whose copies are `backend`'s.
  // Each rank passes its own unreduced gradients; the optimizer averages them.
  // Its device statistics (the gate, the update sums) go to `stats`, which its owner allocates
  // once every user reserved its regions; without one the optimizer keeps a block of its own.
  Optimizer(const Config& cfg, const ParamLayout& layout, Backend<T>& backend,
            Communicator* comm = nullptr, DeviceStats<T>* stats = nullptr);
  ~Optimizer();
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  // One update of `params` from this rank's gradients `grads` (averaged over ranks, clipped and
  // applied here; `grads` itself is not modified), enqueued on the backend with nothing read
  // back: the global norm, the clipping coefficient and the verdict stay on the device, and a
  // non-finite gradient norm or loss makes every update op a no-op. `lr` is this step's base
  // learning rate.
  void step_async(T* params, const T* grads, double lr, const StepInputs<T>& in);
  // Overlap (docs/design.md §5.2): backward of the step's last micro-batch has produced every
  // gradient of `stage` (grad_ready_stage) in `grads`; starts the reduce-scatters of the buckets
  // that completes, which step_async then finishes. Optional: step_async starts whatever was not.
  void grads_ready(int stage, const T* grads);
  // After the stats block's download that followed step_async: the step's statistics (reduced
  // over ranks: one host collective).
  OptimizerStats finish_step();
  // The same in two halves, so that a caller can reduce these sums over ranks in its own host
  // collective with its other statistics: this rank's sums of the step (after the download), then
  // the statistics from those sums summed over all ranks.
  std::vector<double> local_sums() const;
  OptimizerStats finish_step(const std::vector<double>& summed_over_ranks);
  // step_async with `smax` [layer][query head] of this step (already reduced over ranks), then
  // a download of the stats block and finish_step; throws NonFiniteError for a skipped step.
  OptimizerStats step(T* params, const T* grads, double lr,
                      const std::vector<std::vector<double>>& smax);

  std::int64_t step_count() const { return t_; }
  // Bytes of optimizer state this rank holds (AdamW m, v shard; the matrix optimizer's state).
  std::size_t state_bytes() const;
  // The matrices this rank owns (and orthogonalises each step).
  std::vector<std::string> owned_matrix_names() const;
  // ZeRO-1's gradient buckets (one reduce-scatter per bucket and group).
  std::size_t grad_buckets() const;
  // Matrices this rank ran Newton-Schulz on during the last step.
  int orthogonalised_last_step() const;
  // Optimizer state as host tensors (for checkpoints), and back.
  TensorMap state() const;
  void load_state(const TensorMap& state, const std::string& source);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::int64_t t_ = 0;
};

// The bytes an Optimizer<float> allocates on its busiest rank of `world` (docs/design.md §5): the
// AdamW moments of its shard, the momentum of its matrices, the Newton-Schulz workspace, QK-clip's
// factors and the ZeRO-1 staging buffers; computed from the config without allocating (the owner
// assignment is the plan's own; above a few million matrices it is bounded instead). The sizes
// must be representable (estimate_model_memory checks them first).
std::size_t optimizer_memory_bytes(const Config& cfg, int world);

extern template class Optimizer<float>;
extern template class Optimizer<double>;

}  // namespace moetrain
