#include "optim/qk_clip.hpp"

#include <algorithm>

namespace moetrain {

template <typename T>
QkClip<T>::QkClip(const Config& cfg, const ParamLayout& layout, Zero1Plan<T>& plan)
    : cfg_(cfg), plan_(plan) {
  const auto is_qk = [](ParamRole r) { return r == ParamRole::AttnQ || r == ParamRole::AttnK; };
  std::vector<std::int32_t> mats;
  const auto add = [&](std::size_t offset, ParamRole role, int layer) {
    targets_.push_back({offset, role == ParamRole::AttnQ});
    mats.push_back(layer);
    mats.push_back(role == ParamRole::AttnQ ? 1 : 0);
  };
  // The q and k matrices are in the matrix group exactly when the plan lists matrices.
  const bool owned = !plan.matrices().empty();
  if (owned) {
    for (const OwnedMatrix& mt : plan.matrices())
      if (plan.owns(mt) && is_qk(mt.role)) add(mt.offset, mt.role, mt.layer);
  } else {
    for (const ParamTensor& t : layout.tensors())
      if (is_qk(t.role)) add(t.offset, t.role, t.layer);
  }
  heads_ = std::size_t(std::max(cfg.model.n_heads, cfg.model.n_kv_heads));
  if (targets_.empty()) return;
  Backend<T>& be = plan.backend();
  mats_ = DeviceBuffer<T, std::int32_t>(be, mats.size());
  be.upload(mats_.get(), mats.data(), mats.size() * sizeof(std::int32_t));
  factors_ = DeviceBuffer<T, T>(be, targets_.size() * heads_);
  if (!owned && plan.comm().rank() != 0) uncounted_ = DeviceBuffer<T, double>(be, 1);
}

template <typename T>
void QkClip<T>::apply(T* params, const T* smax, int slots, const double* gate, double* clipped) {
  if (targets_.empty()) return;
  const ModelConfig& mc = cfg_.model;
  Backend<T>& be = plan_.backend();
  const QkClipShape shape{int(targets_.size()),
                          slots,
                          mc.n_layers,
                          mc.n_heads,
                          mc.n_kv_heads,
                          int(heads_),
                          cfg_.optim.qk_clip_tau,
                          cfg_.optim.qk_clip_alpha};
  be.qk_clip_factors(factors_.get(), uncounted_.get() ? uncounted_.get() : clipped, smax,
                     mats_.get(), shape, gate);
  // Blocks whose factor is 1 (every block of an unclipped step) are not touched.
  const std::size_t head_elems = std::size_t(mc.head_dim) * mc.d_model;
  for (std::size_t m = 0; m < targets_.size(); ++m) {
    const int blocks = targets_[m].q ? mc.n_heads : mc.n_kv_heads;
    be.scale_row_blocks(params + targets_[m].offset, blocks, head_elems,
                        factors_.get() + m * heads_);
  }
}

template class QkClip<float>;
template class QkClip<double>;

}  // namespace moetrain
