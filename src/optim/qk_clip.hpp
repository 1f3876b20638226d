// QK-clip (MuonClip, docs/design.md §4), after the update, on the q and k matrices this rank owns:
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
  QkClip(const Config& cfg, Zero1Plan<T>& plan);
  // `smax` is [slots][layer][query head] of this step (device), reduced (max) over ranks; a head's
  // S_max is its max over the slots. *clipped (device) += the clipped query heads counted on this
  // rank's q matrices. Nothing is scaled when the step's `gate` says skip.
  void apply(T* params, const T* smax, int slots, const double* gate, double* clipped);

 private:
  const Config& cfg_;
  Zero1Plan<T>& plan_;
  std::vector<const OwnedMatrix*> owned_;  // this rank's q and k matrices
  std::size_t heads_ = 0;                  // row blocks per matrix (query or kv heads), at most
  DeviceBuffer<T, std::int32_t> mats_;     // [owned, 2]: (layer, 1 for q_proj / 0 for k_proj)
  DeviceBuffer<T, T> factors_;             // [owned, heads]
};

extern template class QkClip<float>;
extern template class QkClip<double>;

}  // namespace moetrain
