// SwiGLU activation on the fused expert hidden h = [w1 x | w3 x]: out = silu(h1) * h3.
#include <cmath>

#include "backend/cpu/ops.hpp"

namespace moetrain::cpu {

template <typename T>
void swiglu_forward(T* out, const T* h, int rows, int ff) {
#pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const T* a = h + std::size_t(r) * 2 * ff;
    const T* b = a + ff;
    T* o = out + std::size_t(r) * ff;
    for (int i = 0; i < ff; ++i) o[i] = a[i] / (T(1) + std::exp(-a[i])) * b[i];
  }
}

// silu'(a) = sig(a) * (1 + a * (1 - sig(a)))
template <typename T>
void swiglu_backward(T* dh, const T* dout, const T* h, int rows, int ff) {
#pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const T* a = h + std::size_t(r) * 2 * ff;
    const T* b = a + ff;
    const T* g = dout + std::size_t(r) * ff;
    T* da = dh + std::size_t(r) * 2 * ff;
    T* db = da + ff;
    for (int i = 0; i < ff; ++i) {
      const T sig = T(1) / (T(1) + std::exp(-a[i]));
      const T silu = a[i] * sig;
      db[i] = g[i] * silu;
      da[i] = g[i] * b[i] * sig * (T(1) + a[i] * (T(1) - sig));
    }
  }
}

MOETRAIN_CPU_INSTANTIATE(MOETRAIN_OPS_SWIGLU)

}  // namespace moetrain::cpu
