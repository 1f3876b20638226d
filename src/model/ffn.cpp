#include "model/ffn.hpp"

#include "model/linear.hpp"

namespace moetrain {

template <typename T>
void ffn_forward(Backend<T>& be, const T* params, const SwiGluOffsets& w, int d, CDevPtr x,
                 int rows, const FfnActs& a, DevPtr out) {
  linear_forward(be, a.h, x, params + w.w13, rows, d, 2 * w.ff);
  be.swiglu_forward(a.act, a.h, rows, w.ff);
  linear_forward(be, out, a.act, params + w.w2, rows, w.ff, d, /*accumulate=*/true);
}

template <typename T>
void ffn_backward(Backend<T>& be, const T* params, T* grads, const SwiGluOffsets& w, int d,
                  CDevPtr x, int rows, const FfnActs& a, CDevPtr dout, DevPtr dx,
                  bool accumulate_dx, const FfnScratch& s) {
  linear_backward(be, s.dact, grads + w.w2, dout, a.act, params + w.w2, rows, w.ff, d, false);
  be.swiglu_backward(s.dh, s.dact, a.h, rows, w.ff);
  linear_backward(be, dx, grads + w.w13, s.dh, x, params + w.w13, rows, d, 2 * w.ff, accumulate_dx);
}

#define MOETRAIN_INSTANTIATE(T)                                                                \
  template void ffn_forward<T>(Backend<T>&, const T*, const SwiGluOffsets&, int, CDevPtr, int, \
                               const FfnActs&, DevPtr);                                        \
  template void ffn_backward<T>(Backend<T>&, const T*, T*, const SwiGluOffsets&, int, CDevPtr, \
                                int, const FfnActs&, CDevPtr, DevPtr, bool, const FfnScratch&);
MOETRAIN_INSTANTIATE(float)
MOETRAIN_INSTANTIATE(double)
#undef MOETRAIN_INSTANTIATE

}  // namespace moetrain
