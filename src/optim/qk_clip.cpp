#include "optim/qk_clip.hpp"

#include <algorithm>

namespace moetrain {

template <typename T>
QkClip<T>::QkClip(const Config& cfg, Zero1Plan<T>& plan) : cfg_(cfg), plan_(plan) {
  std::vector<std::int32_t> mats;
  for (const OwnedMatrix& mt : plan.matrices())
    if (plan.owns(mt) && (mt.role == ParamRole::AttnQ || mt.role == ParamRole::AttnK)) {
      owned_.push_back(&mt);
      mats.push_back(mt.layer);
      mats.push_back(mt.role == ParamRole::AttnQ ? 1 : 0);
    }
  heads_ = std::size_t(std::max(cfg.model.n_heads, cfg.model.n_kv_heads));
  if (owned_.empty()) return;
  Backend<T>& be = plan.backend();
  mats_ = DeviceBuffer<T, std::int32_t>(be, mats.size());
  be.upload(mats_.get(), mats.data(), mats.size() * sizeof(std::int32_t));
  factors_ = DeviceBuffer<T, T>(be, owned_.size() * heads_);
}

template <typename T>
void QkClip<T>::apply(T* params, const T* smax, int slots, const double* gate, double* clipped) {
  if (owned_.empty()) return;
  const ModelConfig& mc = cfg_.model;
  Backend<T>& be = plan_.backend();
  const QkClipShape shape{int(owned_.size()),
                          slots,
                          mc.n_layers,
                          mc.n_heads,
                          mc.n_kv_heads,
                          int(heads_),
                          cfg_.optim.qk_clip_tau,
                          cfg_.optim.qk_clip_alpha};
  be.qk_clip_factors(factors_.get(), clipped, smax, mats_.get(), shape, gate);
  // Blocks whose factor is 1 (every block of an unclipped step) are not touched.
  const std::size_t head_elems = std::size_t(mc.head_dim) * mc.d_model;
  for (std::size_t m = 0; m < owned_.size(); ++m) {
    const OwnedMatrix& mt = *owned_[m];
    const int blocks = mt.role == ParamRole::AttnQ ? mc.n_heads : mc.n_kv_heads;
    be.scale_row_blocks(params + mt.offset, blocks, head_elems, factors_.get() + m * heads_);
  }
}

template class QkClip<float>;
template class QkClip<double>;

}  // namespace moetrain
