// Causal multi-head attention with GQA over the fused qkv buffer, and its backward, tiled as flash
// attention is: no T x T matrix exists, keys above the diagonal are never computed.
//
// Tiles are kQuery query rows by up to kSpan keys: a query block's keys 0..end (end = the block's
// last row + 1) in spans of kSpan, the last span cut at end, so the masked work is the diagonal's
// upper triangle of at most kQuery x kQuery and at T <= kSpan a row's softmax is one pass (no
// rescaling). Forward, per (batch, head) and query block: for each key span, S = Q K^T / sqrt(hd)
// into a [kQuery, kSpan] tile, an online softmax over it (the running row max m — also S_max's
// source for QK-clip — and the running sum l, the output rescaled by exp(m_old - m_new) when a
// later span raises m), O += P V. The row's logsumexp m + log l is saved for backward (B*H*T).
// Backward, per (batch, kv head) so that the query heads sharing a kv head accumulate their dK, dV
// in a fixed order on one thread (deterministic, no atomics): per query block and key span, P is
// recomputed from the logsumexp, and dV += P^T dO, dS = P (dO V^T - rowsum(dO O)), dK += dS^T Q,
// dQ += dS K. The tile products are tile_gemm's, on the thread that owns the task; K (and V) are
// transposed once per task so that Q K^T (dO V^T) reads them as rows. Larger tiles than 64 x 64
// keep tile_gemm's k loops long and its calls few: at B 8, T 256, 4 heads of 64 on a Zen 4 core
// pair, 64 x 64 tiles took 5.1 ms forward and 10.8 ms backward per layer.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "backend/cpu/ops.hpp"
#include "backend/cpu/tile_gemm.hpp"
#include "backend/cpu/vector_exp.hpp"

namespace moetrain::cpu {

namespace {
// Rows of a query block, and keys of a span: a [64, 256] score tile (64 KiB of fp32), the span's
// K^T and V and the block's Q and O stay in L2 while they are reused.
constexpr int kQuery = 64;
constexpr int kSpan = 256;

// The largest of x[0..n), n >= 1, in 16 independent lanes (the vectoriser's form of a max
// reduction; the result is the same in any order).
template <typename T>
T row_max(const T* x, int n) {
  constexpr int kLanes = 16;
  if (n < kLanes) {
    T m = x[0];
    for (int j = 1; j < n; ++j) m = std::max(m, x[j]);
    return m;
  }
  T lane[kLanes];
  for (int c = 0; c < kLanes; ++c) lane[c] = x[c];
  int j = kLanes;
  for (; j + kLanes <= n; j += kLanes)
    for (int c = 0; c < kLanes; ++c) lane[c] = lane[c] > x[j + c] ? lane[c] : x[j + c];
  T m = lane[0];
  for (int c = 1; c < kLanes; ++c) m = std::max(m, lane[c]);
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}
}  // namespace

std::size_t attention_saved_elems(const AttentionShape& s) {
  return std::size_t(s.batch) * std::size_t(s.n_heads) * std::size_t(s.seq);  // logsumexp
}

template <typename T>
void attention_forward(T* out, T* lse, T* smax, const T* qkv, const AttentionShape& s) {
  const int Tq = s.seq, hd = s.head_dim, ld = s.qkv_width(), ldo = s.out_width();
  const int group = s.n_heads / s.n_kv_heads;
  const T scale = T(1.0 / std::sqrt(double(hd)));
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int tasks = s.batch * s.n_heads;
  std::vector<T> head_max(std::size_t(tasks), neg_inf);

#pragma omp parallel
  {
    std::vector<T> S(std::size_t(kQuery) * kSpan);  // [kQuery q rows, kSpan keys]
    std::vector<T> m(kQuery), l(kQuery);            // running row max and sum of the block
    std::vector<T> kt(std::size_t(hd) * Tq);        // [hd, Tq]: the task's K transposed
#pragma omp for schedule(static)
    for (int task = 0; task < tasks; ++task) {
      const int b = task / s.n_heads, h = task % s.n_heads, g = h / group;
      const T* base = qkv + std::size_t(b) * Tq * ld;
      const T* q = base + std::size_t(h) * hd;
      const T* k = base + std::size_t(s.n_heads + g) * hd;
      const T* v = base + std::size_t(s.n_heads + s.n_kv_heads + g) * hd;
      T* o = out + std::size_t(b) * Tq * ldo + std::size_t(h) * hd;  // [Tq, hd] at stride ldo
      T* lse_h = lse + std::size_t(task) * Tq;
      transpose_block(kt.data(), k, Tq, hd, ld);
      T mx_all = neg_inf;
      for (int i0 = 0; i0 < Tq; i0 += kQuery) {
        const int nq = std::min(kQuery, Tq - i0), end = i0 + nq;  // keys j < end
        std::fill_n(m.begin(), nq, neg_inf);
        std::fill_n(l.begin(), nq, T(0));
        for (int j0 = 0; j0 < end; j0 += kSpan) {
          const int nk = std::min(kSpan, end - j0);
          tile_gemm(nq, nk, hd, scale, q + std::size_t(i0) * ld, ld, 1, kt.data() + j0, Tq,
                    S.data(), kSpan, false);
          for (int r = 0; r < nq; ++r) {
            T* row = S.data() + std::size_t(r) * kSpan;
            const int valid = std::clamp(i0 + r - j0 + 1, 0, nk);  // keys j <= i
            std::fill(row + valid, row + nk, T(0));
            if (valid == 0) continue;
            const T mx = row_max(row, valid);
            mx_all = std::max(mx_all, mx);
            const T m_new = std::max(m[r], mx);
            const T sum = exp_shifted_sum(row, valid, m_new);
            if (j0 > 0 && m[r] != m_new) {  // rescale what earlier spans added
              const T alpha = std::exp(m[r] - m_new);
              T* orow = o + std::size_t(i0 + r) * ldo;
              for (int c = 0; c < hd; ++c) orow[c] *= alpha;
              l[r] *= alpha;
            }
            l[r] += sum;
            m[r] = m_new;
          }
          // The first span writes O, later ones add to it.
          tile_gemm(nq, hd, nk, T(1), S.data(), kSpan, 1, v + std::size_t(j0) * ld, ld,
                    o + std::size_t(i0) * ldo, ldo, j0 > 0);
        }
        for (int r = 0; r < nq; ++r) {
          const T inv = T(1) / l[r];
          T* orow = o + std::size_t(i0 + r) * ldo;
          for (int c = 0; c < hd; ++c) orow[c] *= inv;
          lse_h[i0 + r] = m[r] + std::log(l[r]);
        }
      }
      head_max[std::size_t(task)] = mx_all;
    }
  }
  for (int h = 0; h < s.n_heads; ++h) {
    T mh = neg_inf;
    for (int b = 0; b < s.batch; ++b) mh = std::max(mh, head_max[std::size_t(b) * s.n_heads + h]);
    smax[h] = mh;
  }
}

template <typename T>
void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* out, const T* lse,
                        const AttentionShape& s) {
  const int Tq = s.seq, hd = s.head_dim, ld = s.qkv_width(), ldo = s.out_width();
  const int group = s.n_heads / s.n_kv_heads;
  const T scale = T(1.0 / std::sqrt(double(hd)));
  const int tasks = s.batch * s.n_kv_heads;

#pragma omp parallel
  {
    // [kQuery q rows, kSpan keys] each
    std::vector<T> P(std::size_t(kQuery) * kSpan), dS(std::size_t(kQuery) * kSpan);
    std::vector<T> kt(std::size_t(hd) * Tq), vt(std::size_t(hd) * Tq);  // [hd, Tq] each
    std::vector<T> D(static_cast<std::size_t>(Tq));  // rowsum(dO * O) = rowsum(dP * P), per row
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
      transpose_block(kt.data(), k, Tq, hd, ld);
      transpose_block(vt.data(), v, Tq, hd, ld);
      for (int i = 0; i < Tq; ++i) {
        std::fill_n(dk + std::size_t(i) * ld, hd, T(0));
        std::fill_n(dv + std::size_t(i) * ld, hd, T(0));
      }
      for (int h = g * group; h < (g + 1) * group; ++h) {
        const T* q = base + std::size_t(h) * hd;
        T* dq = dbase + std::size_t(h) * hd;
        const T* dO = dout + row0 * ldo + std::size_t(h) * hd;
        const T* O = out + row0 * ldo + std::size_t(h) * hd;
        const T* lse_h = lse + (std::size_t(b) * s.n_heads + h) * Tq;
        for (int i = 0; i < Tq; ++i) {
          const T* a = dO + std::size_t(i) * ldo;
          const T* c = O + std::size_t(i) * ldo;
          T dot = 0;
          for (int e = 0; e < hd; ++e) dot += a[e] * c[e];
          D[std::size_t(i)] = dot;
        }
        for (int i0 = 0; i0 < Tq; i0 += kQuery) {
          const int nq = std::min(kQuery, Tq - i0), end = i0 + nq;
          for (int j0 = 0; j0 < end; j0 += kSpan) {
            const int nk = std::min(kSpan, end - j0);
            tile_gemm(nq, nk, hd, scale, q + std::size_t(i0) * ld, ld, 1, kt.data() + j0, Tq,
                      P.data(), kSpan, false);
            tile_gemm(nq, nk, hd, T(1), dO + std::size_t(i0) * ldo, ldo, 1, vt.data() + j0, Tq,
                      dS.data(), kSpan, false);
            for (int r = 0; r < nq; ++r) {
              T* p = P.data() + std::size_t(r) * kSpan;
              T* ds = dS.data() + std::size_t(r) * kSpan;
              const int valid = std::clamp(i0 + r - j0 + 1, 0, nk);
              exp_shifted_sum(p, valid, lse_h[i0 + r]);
              const T Di = D[std::size_t(i0 + r)];
              for (int j = 0; j < valid; ++j) ds[j] = p[j] * (ds[j] - Di);
              std::fill(p + valid, p + nk, T(0));
              std::fill(ds + valid, ds + nk, T(0));
            }
            // P^T and dS^T as the left operands: a(m, k) = P[k][m].
            tile_gemm(nk, hd, nq, T(1), P.data(), 1, kSpan, dO + std::size_t(i0) * ldo, ldo,
                      dv + std::size_t(j0) * ld, ld, true);
            tile_gemm(nk, hd, nq, scale, dS.data(), 1, kSpan, q + std::size_t(i0) * ld, ld,
                      dk + std::size_t(j0) * ld, ld, true);
            // The first span writes the block's dQ, later ones add to it.
            tile_gemm(nq, hd, nk, scale, dS.data(), kSpan, 1, k + std::size_t(j0) * ld, ld,
                      dq + std::size_t(i0) * ld, ld, j0 > 0);
          }
        }
      }
    }
  }
}

MOETRAIN_CPU_INSTANTIATE(MOETRAIN_OPS_ATTENTION)

}  // namespace moetrain::cpu
