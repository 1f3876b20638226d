// The linear-algebra ops (SOAP's eigenbases) through LAPACK, one matrix after another: each
// LAPACK call uses OpenBLAS's threads itself.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "backend/cpu/lapack.hpp"
#include "backend/cpu/ops.hpp"

namespace moetrain::cpu {

template <typename T>
void symmetric_eigenvectors_batched(T* Q, const T* P, int n, int batch) {
  const std::size_t N = std::size_t(n), nn = N * N;
  std::vector<T> a(nn), w(N);
  for (int b = 0; b < batch; ++b) {
    std::copy_n(P + std::size_t(b) * nn, nn, a.data());  // symmetric: either layout
    lapack::symmetric_eigen(n, a.data(), w.data());
    // Column j of the column-major result is the eigenvector of the j-th smallest eigenvalue.
    T* q = Q + std::size_t(b) * nn;
    for (std::size_t r = 0; r < N; ++r)
      for (std::size_t j = 0; j < N; ++j) q[r * N + j] = a[(N - 1 - j) * N + r];
  }
}

template <typename T>
void qr_orthonormalize_batched(T* Q, const T* A, int n, int batch) {
  const std::size_t N = std::size_t(n), nn = N * N;
  std::vector<T> a(nn);
  for (int b = 0; b < batch; ++b) {
    const T* in = A + std::size_t(b) * nn;
    for (std::size_t r = 0; r < N; ++r)
      for (std::size_t c = 0; c < N; ++c) a[c * N + r] = in[r * N + c];
    lapack::qr_q(n, a.data());
    T* q = Q + std::size_t(b) * nn;
    for (std::size_t r = 0; r < N; ++r)
      for (std::size_t c = 0; c < N; ++c) q[r * N + c] = a[c * N + r];
  }
}

template <typename T>
void sort_eigenbasis(T* sorted, T* v_out, const T* Q, const T* PQ, const T* v, int n, int batch,
                     int v_rows, int v_cols, bool v_rows_axis) {
  const std::size_t N = std::size_t(n), nn = N * N;
  const std::size_t VR = std::size_t(v_rows), VC = std::size_t(v_cols), ve = VR * VC;
  std::vector<double> e(N);
  std::vector<std::size_t> order(N);
  for (int b = 0; b < batch; ++b) {
    const T* q = Q + std::size_t(b) * nn;
    const T* pq = PQ + std::size_t(b) * nn;
    std::fill(e.begin(), e.end(), 0.0);
    for (std::size_t r = 0; r < N; ++r)
      for (std::size_t j = 0; j < N; ++j) e[j] += double(q[r * N + j]) * pq[r * N + j];
    for (double& x : e)
      if (std::isnan(x)) x = -std::numeric_limits<double>::infinity();
    std::iota(order.begin(), order.end(), std::size_t(0));
    std::stable_sort(order.begin(), order.end(),
                     [&](std::size_t a, std::size_t c) { return e[a] > e[c]; });
    T* s = sorted + std::size_t(b) * nn;
    for (std::size_t r = 0; r < N; ++r)
      for (std::size_t j = 0; j < N; ++j) s[r * N + j] = pq[r * N + order[j]];
    const T* vin = v + std::size_t(b) * ve;
    T* vo = v_out + std::size_t(b) * ve;
    for (std::size_t r = 0; r < VR; ++r)
      for (std::size_t c = 0; c < VC; ++c)
        vo[r * VC + c] = v_rows_axis ? vin[order[r] * VC + c] : vin[r * VC + order[c]];
  }
}

MOETRAIN_CPU_INSTANTIATE(MOETRAIN_OPS_LINALG)

}  // namespace moetrain::cpu
