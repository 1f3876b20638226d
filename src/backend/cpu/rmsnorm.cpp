// RMSNorm: y = x / sqrt(mean(x^2) + eps) * g, statistics accumulated in double.
#include <omp.h>

#include <cmath>
#include <vector>

#include "backend/cpu/lane_reduce.hpp"
#include "backend/cpu/ops.hpp"

namespace moetrain::cpu {

template <typename T, typename A>
void rmsnorm_forward(A* out, T* rstd, const A* x, const T* gain, int n, int d, double eps) {
#pragma omp parallel for schedule(static)
  for (int i = 0; i < n; ++i) {
    const A* xi = x + std::size_t(i) * d;
    const double ss = lane_sum<double>(0, d, [xi](int c) { return double(xi[c]) * double(xi[c]); });
    const T r = T(1.0 / std::sqrt(ss / d + eps));
    rstd[i] = r;
    A* yi = out + std::size_t(i) * d;
    for (int c = 0; c < d; ++c) yi[c] = xi[c] * r * gain[c];
  }
}

// With xhat = x * rstd and gh = dy * g: dx = rstd * (gh - xhat * mean(gh * xhat)),
// dg = sum over rows of dy * xhat. The dg partial sums are per thread and added in thread order,
// so the result is deterministic for a fixed thread count.
template <typename T, typename A>
void rmsnorm_backward(A* dx, T* dgain, const A* dout, const A* x, const T* gain, const T* rstd,
                      int n, int d) {
  const int nt = omp_get_max_threads();
  std::vector<T> partial(std::size_t(nt) * d, T(0));
#pragma omp parallel
  {
    T* dg = partial.data() + std::size_t(omp_get_thread_num()) * d;
#pragma omp for schedule(static)
    for (int i = 0; i < n; ++i) {
      const A* xi = x + std::size_t(i) * d;
      const A* dyi = dout + std::size_t(i) * d;
      const T r = rstd[i];
      const double dot = lane_sum<double>(
          0, d, [dyi, gain, xi](int c) { return double(T(dyi[c]) * gain[c]) * double(xi[c]); });
      const T m = T(dot * double(r) / d);
      A* dxi = dx + std::size_t(i) * d;
      for (int c = 0; c < d; ++c) {
        const T xhat = xi[c] * r;
        dxi[c] = A(T(dxi[c]) + r * (dyi[c] * gain[c] - xhat * m));
        dg[c] += dyi[c] * xhat;
      }
    }
  }
  for (int t = 0; t < nt; ++t)
    for (int c = 0; c < d; ++c) dgain[c] += partial[std::size_t(t) * d + c];
}

MOETRAIN_CPU_INSTANTIATE_ACT(MOETRAIN_OPS_RMSNORM)

}  // namespace moetrain::cpu
