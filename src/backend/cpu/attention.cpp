// Causal multi-head attention with GQA over the fused qkv buffer, and its backward.
//
// Per (batch, head): S = Q K^T / sqrt(hd) as one GEMM, causal softmax row by row (recording the
// largest pre-softmax logit for QK-clip), O = P V as a second GEMM. P is kept for the backward.
// Work is split over (batch, kv head) pairs so that the query heads sharing a kv head accumulate
// their dK, dV in a fixed order on one thread: deterministic, no atomics.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "backend/cpu/ops.hpp"

namespace moetrain::cpu {

std::size_t attention_saved_elems(const AttentionShape& s) {
  return s.probs_elems();  // P
}

template <typename T>
void attention_forward(T* out, T* probs, T* smax, const T* qkv, const AttentionShape& s) {
  const int Tq = s.seq, hd = s.head_dim, ld = s.qkv_width(), ldo = s.out_width();
  const int group = s.n_heads / s.n_kv_heads;
  const T scale = T(1.0 / std::sqrt(double(hd)));
  const int tasks = s.batch * s.n_heads;
  std::vector<T> head_max(std::size_t(tasks), -std::numeric_limits<T>::infinity());

  SingleThreadedBlas blas_per_task;
#pragma omp parallel for schedule(static)
  for (int task = 0; task < tasks; ++task) {
    const int b = task / s.n_heads, h = task % s.n_heads, g = h / group;
    const T* base = qkv + std::size_t(b) * Tq * ld;
    const T* q = base + std::size_t(h) * hd;
    const T* k = base + std::size_t(s.n_heads + g) * hd;
    const T* v = base + std::size_t(s.n_heads + s.n_kv_heads + g) * hd;
    T* P = probs + std::size_t(task) * Tq * Tq;
    gemm<T>(false, true, Tq, Tq, hd, scale, q, ld, k, ld, T(0), P, Tq);
    T mx_all = -std::numeric_limits<T>::infinity();
    for (int i = 0; i < Tq; ++i) {
      T* row = P + std::size_t(i) * Tq;
      T mx = row[0];
      for (int j = 1; j <= i; ++j) mx = std::max(mx, row[j]);
      mx_all = std::max(mx_all, mx);
      T sum = 0;
      for (int j = 0; j <= i; ++j) {
        row[j] = std::exp(row[j] - mx);
        sum += row[j];
      }
      const T inv = T(1) / sum;
      for (int j = 0; j <= i; ++j) row[j] *= inv;
      std::fill(row + i + 1, row + Tq, T(0));
    }
    head_max[std::size_t(task)] = mx_all;
    gemm<T>(false, false, Tq, hd, Tq, T(1), P, Tq, v, ld, T(0),
            out + std::size_t(b) * Tq * ldo + std::size_t(h) * hd, ldo);
  }
  for (int h = 0; h < s.n_heads; ++h) {
    T m = -std::numeric_limits<T>::infinity();
    for (int b = 0; b < s.batch; ++b) m = std::max(m, head_max[std::size_t(b) * s.n_heads + h]);
    smax[h] = m;
  }
}

// dP = dO V^T;  dV += P^T dO;  dS = P * (dP - rowsum(dP * P));
// dQ = dS K / sqrt(hd);  dK += dS^T Q / sqrt(hd).
template <typename T>
void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* /*out: P suffices*/,
                        const T* probs, const AttentionShape& s) {
  const int Tq = s.seq, hd = s.head_dim, ld = s.qkv_width(), ldo = s.out_width();
  const int group = s.n_heads / s.n_kv_heads;
  const T scale = T(1.0 / std::sqrt(double(hd)));
  const int tasks = s.batch * s.n_kv_heads;

  SingleThreadedBlas blas_per_task;
#pragma omp parallel
  {
    std::vector<T> dP(std::size_t(Tq) * Tq);
#pragma omp for schedule(static)
    for (int task = 0; task < tasks; ++task) {
      const int b = task / s.n_kv_heads, g = task % s.n_kv_heads;
      const std::size_t row0 = std::size_t(b) * Tq;
      const T* base = qkv + row0 * ld;
      T* dbase = dqkv + row0 * ld;
      const T* k = base + std::size_t(s.n_heads + g) * hd;
      const T* v = base + std::size_t(s.n_heads + s.n_kv_heads + g) * hd;
      T* dk = dbase + std::size_t(s.n_heads + g) * hd;
      T* dv = dbase + std::size_t(s.n_heads + s.n_kv_heads + g) * hd;
      for (int i = 0; i < Tq; ++i) {
        std::fill_n(dk + std::size_t(i) * ld, hd, T(0));
        std::fill_n(dv + std::size_t(i) * ld, hd, T(0));
      }
      for (int h = g * group; h < (g + 1) * group; ++h) {
        const T* q = base + std::size_t(h) * hd;
        T* dq = dbase + std::size_t(h) * hd;
        const T* P = probs + (std::size_t(b) * s.n_heads + h) * Tq * Tq;
        const T* dO = dout + row0 * ldo + std::size_t(h) * hd;
        gemm<T>(false, true, Tq, Tq, hd, T(1), dO, ldo, v, ld, T(0), dP.data(), Tq);
        gemm<T>(true, false, Tq, hd, Tq, T(1), P, Tq, dO, ldo, T(1), dv, ld);
        for (int i = 0; i < Tq; ++i) {
          T* dpi = dP.data() + std::size_t(i) * Tq;
          const T* pi = P + std::size_t(i) * Tq;
          T dot = 0;
          for (int j = 0; j <= i; ++j) dot += dpi[j] * pi[j];
          for (int j = 0; j <= i; ++j) dpi[j] = pi[j] * (dpi[j] - dot);
          std::fill(dpi + i + 1, dpi + Tq, T(0));
        }
        gemm<T>(false, false, Tq, hd, Tq, scale, dP.data(), Tq, k, ld, T(0), dq, ld);
        gemm<T>(true, false, Tq, hd, Tq, scale, dP.data(), Tq, q, ld, T(1), dk, ld);
      }
    }
  }
}

MOETRAIN_CPU_INSTANTIATE(MOETRAIN_OPS_ATTENTION)

}  // namespace moetrain::cpu
