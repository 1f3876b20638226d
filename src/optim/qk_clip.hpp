// QK-clip (optim.qk_clip; MuonClip = Muon + QK-clip, docs/design.md §4.7), after the update, on
// the q and k matrices: those this rank owns when they are in the matrix group (each clipped once
// in the cluster, before the owners' gather), or every rank's full copy when they are in the
// AdamW group (after its gather every rank holds them, and all compute the same factors from the
// same S_max; only rank 0 counts the clipped heads):
// gamma_h = min(1, tau / S_max[l][h]); the rows of query head h are scaled by gamma_h^alpha, the
// rows of kv head g by (min over its query heads of gamma_h)^(1 - alpha). The factors are computed
// on the device from the device S_max (Backend::qk_clip_factors), so the step reads nothing back.
#pragma once

#include <cstdint>
#include <vector>

#include "moetrain/backend.hpp"
#include "moetrain/config.hpp"
#include "optim/zero1.hpp"

namespace moetrain {

template <typename T>
class QkClip {
 public:
  QkClip(const Config& cfg, const ParamLayout& layout, Zero1Plan<T>& plan);
  // `smax` is [slots][layer][query head] of this step (device), reduced (max) over ranks; a head's
  // S_max is its max over the slots. *clipped (device) += the clipped query heads counted on this
  // rank's q matrices (none on ranks other than 0 when the clip is replicated). Nothing is scaled
  // when the step's `gate` says skip.
  void apply(T* params, const T* smax, int slots, const double* gate, double* clipped);

 private:
  const Config& cfg_;
  Zero1Plan<T>& plan_;
  struct Target {
    std::size_t offset;  // in params
    bool q;              // q_proj (else k_proj)
  };
  std::vector<Target> targets_;         // the q and k matrices this rank clips
  std::size_t heads_ = 0;               // row blocks per matrix (query or kv heads), at most
  DeviceBuffer<T, std::int32_t> mats_;  // [targets, 2]: (layer, 1 for q_proj / 0 for k_proj)
  DeviceBuffer<T, T> factors_;          // [targets, heads]
  DeviceBuffer<T, double> uncounted_;   // [1]: where a replica that does not count adds
};

extern template class QkClip<float>;
extern template class QkClip<double>;

}  // namespace moetrain
