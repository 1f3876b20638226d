#include "model/moe/experts.hpp"

#include <stdexcept>

namespace moetrain {

template <typename T>
Experts<T>::Experts(Backend<T>& be, const std::vector<SwiGluOffsets>& experts, int rows, int d)
    : be_(be),
      experts_(int(experts.size())),
      ff_(experts.at(0).ff),
      rows_(rows),
      d_(d),
      w13_(experts[0].w13),
      w2_(experts[0].w2),
      stride_(experts.size() > 1 ? experts[1].w13 - experts[0].w13 : 0) {
  for (std::size_t e = 0; e < experts.size(); ++e)
    if (experts[e].w13 != w13_ + e * stride_ || experts[e].w2 != w2_ + e * stride_ ||
        experts[e].ff != ff_)
      throw std::logic_error("Experts: expert weights are not evenly strided in the layout");
}

template <typename T>
void Experts<T>::plan_acts(ArenaPlan& plan, Acts& a, std::size_t rows, std::size_t ff,
                           std::size_t d, Storage s) {
  plan.request(a.h, checked_mul(checked_mul(rows, 2), ff), s);
  plan.request(a.act, checked_mul(rows, ff), s);
  plan.request(a.y, checked_mul(rows, d), s);
}

template <typename T>
void Experts<T>::plan(ArenaPlan& plan) {
  plan_acts(plan, acts_, std::size_t(rows_), std::size_t(ff_), std::size_t(d_),
            be_.activation_storage());
}

// h = xg W13_e^T, act = swiglu(h), y = act W2_e^T, each over all experts at once.
template <typename T>
void Experts<T>::forward(const T* params, CDevPtr xg, const std::int32_t* offsets) {
  const Acts& a = acts_;
  be_.grouped_gemm(true, rows_, 2 * ff_, d_, T(1), xg, d_, params + w13_, d_, stride_, T(0), a.h,
                   2 * ff_, offsets, experts_);
  be_.swiglu_forward(a.act, a.h, rows_, ff_);
  be_.grouped_gemm(true, rows_, d_, ff_, T(1), a.act, ff_, params + w2_, ff_, stride_, T(0), a.y,
                   d_, offsets, experts_);
}

template <typename T>
void Experts<T>::backward(const T* params, T* grads, CDevPtr xg, const std::int32_t* offsets,
                          CDevPtr dy, DevPtr dxg, const FfnScratch& s) {
  const Acts& a = acts_;
  // Through W2: dact = dy W2_e, dW2_e += dy^T act.
  be_.grouped_gemm(false, rows_, ff_, d_, T(1), dy, d_, params + w2_, ff_, stride_, T(0), s.dact,
                   ff_, offsets, experts_);
  be_.grouped_gemm_wgrad(rows_, d_, ff_, T(1), dy, d_, a.act, ff_, grads + w2_, ff_, stride_,
                         offsets, experts_);
  be_.swiglu_backward(s.dh, s.dact, a.h, rows_, ff_);
  // Through W1|W3: dxg = dh W13_e, dW13_e += dh^T xg.
  be_.grouped_gemm(false, rows_, d_, 2 * ff_, T(1), s.dh, 2 * ff_, params + w13_, d_, stride_, T(0),
                   dxg, d_, offsets, experts_);
  be_.grouped_gemm_wgrad(rows_, 2 * ff_, d_, T(1), s.dh, 2 * ff_, xg, d_, grads + w13_, d_, stride_,
                         offsets, experts_);
}

template class Experts<float>;
template class Experts<double>;

}  // namespace moetrain
