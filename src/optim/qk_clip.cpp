#include "optim/qk_clip.hpp"

#include <algorithm>
#include <cmath>

namespace moetrain {

template <typename T>
QkClip<T>::QkClip(const Config& cfg, Zero1Plan<T>& plan) : cfg_(cfg), plan_(plan) {
  for (const OwnedMatrix& mt : plan.matrices())
    if (plan.owns(mt) && (mt.role == ParamRole::AttnQ || mt.role == ParamRole::AttnK))
      owned_.push_back(&mt);
  heads_ = std::size_t(std::max(cfg.model.n_heads, cfg.model.n_kv_heads));
  if (!owned_.empty()) factors_ = DeviceBuffer<T, T>(plan.backend(), owned_.size() * heads_);
}

template <typename T>
int QkClip<T>::apply(T* params, const std::vector<std::vector<double>>& smax) {
  if (owned_.empty()) return 0;
  const ModelConfig& mc = cfg_.model;
  const double tau = cfg_.optim.qk_clip_tau, alpha = cfg_.optim.qk_clip_alpha;
  const int group = mc.n_heads / mc.n_kv_heads;
  const std::size_t head_elems = std::size_t(mc.head_dim) * mc.d_model;
  std::vector<T> factors(owned_.size() * heads_, T(1));
  int clipped = 0;
  for (std::size_t m = 0; m < owned_.size(); ++m) {
    const OwnedMatrix& mt = *owned_[m];
    const auto& s = smax[std::size_t(mt.layer)];
    T* f = factors.data() + m * heads_;
    for (int g = 0; g < mc.n_kv_heads; ++g) {
      double gmin = 1.0;
      for (int h = g * group; h < (g + 1) * group; ++h) {
        if (!(s[std::size_t(h)] > tau)) continue;
        const double gamma = tau / s[std::size_t(h)];
        gmin = std::min(gmin, gamma);
        if (mt.role == ParamRole::AttnQ) {
          ++clipped;
          f[h] = T(std::pow(gamma, alpha));
        }
      }
      if (mt.role == ParamRole::AttnK && gmin < 1.0) f[g] = T(std::pow(gmin, 1.0 - alpha));
    }
  }
  // Nothing over tau on this rank's matrices: no upload, no launch.
  if (std::all_of(factors.begin(), factors.end(), [](T f) { return f == T(1); })) return clipped;
  Backend<T>& be = plan_.backend();
  be.upload(factors_.get(), factors.data(), factors.size() * sizeof(T));
  for (std::size_t m = 0; m < owned_.size(); ++m) {
    const OwnedMatrix& mt = *owned_[m];
    const int blocks = mt.role == ParamRole::AttnQ ? mc.n_heads : mc.n_kv_heads;
    be.scale_row_blocks(params + mt.offset, blocks, head_elems, factors_.get() + m * heads_);
  }
  return clipped;
}

template class QkClip<float>;
template class QkClip<double>;

}  // namespace moetrain
