// QK-clip (MuonClip, docs/design.md §4), after the update, on the q and k matrices this rank owns:
// gamma_h = min(1, tau / S_max[l][h]); the rows of query head h are scaled by gamma_h^alpha, the
// rows of kv head g by (min over its query heads of gamma_h)^(1 - alpha).
#pragma once

#include <vector>

#include "optim/zero1.hpp"

namespace moetrain {

template <typename T>
class QkClip {
 public:
  QkClip(const Config& cfg, Zero1Plan<T>& plan);

  // `smax` is [layer][query head] of this step, reduced (max) over ranks. Returns the clipped
  // query heads counted on this rank's q matrices.
  int apply(T* params, const std::vector<std::vector<double>>& smax);

 private:
  const Config& cfg_;
  Zero1Plan<T>& plan_;
  std::vector<const OwnedMatrix*> owned_;  // this rank's q and k matrices
  std::size_t heads_ = 0;                  // row blocks per matrix (query or kv heads), at most
  DeviceBuffer<T, T> factors_;             // [owned q/k matrices, heads]: one upload per step
};

extern template class QkClip<float>;
extern template class QkClip<double>;

}  // namespace moetrain
