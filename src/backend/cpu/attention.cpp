// Causal multi-head attention with GQA over the fused qkv buffer, and its backward, tiled as flash
// attention is: no T x T matrix exists, key blocks above the diagonal are never computed.
//
// Forward, per (batch, head) and query block: for each key block up to the diagonal, S = Q K^T /
// sqrt(hd) into a [kBlock, kBlock] tile, an online softmax over it (the running row max m — also
// S_max's source for QK-clip — and the running sum l, the output rescaled by exp(m_old - m_new)),
// O += P V. The row's logsumexp m + log l is saved for backward (B*H*T values).
// Backward, per (batch, kv head) so that the query heads sharing a kv head accumulate their dK, dV
// in a fixed order on one thread (deterministic, no atomics): each tile's P is recomputed from the
// logsumexp, and dV += P^T dO, dS = P (dO V^T - rowsum(dO O)), dK += dS^T Q, dQ += dS K.
// The tile products are tile_gemm's, on the thread that owns the task; K (and V) are transposed
// once per task so that Q K^T (dO V^T) reads them as rows.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "backend/cpu/ops.hpp"
#include "backend/cpu/tile_gemm.hpp"
#include "backend/cpu/vector_exp.hpp"

namespace moetrain::cpu {

namespace {
// Rows of a query block and of a key block: a [64, 64] score tile and a [64, hd] output block stay
// in L1/L2 while they are reused.
constexpr int kBlock = 64;
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
    std::vector<T> S(std::size_t(kBlock) * kBlock);  // [kBlock q rows, kBlock keys]
    std::vector<T> m(kBlock), l(kBlock);             // running row max and sum of the block
    std::vector<T> kt(std::size_t(hd) * Tq);         // [hd, Tq]: the task's K transposed
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
      for (int i0 = 0; i0 < Tq; i0 += kBlock) {
        const int nq = std::min(kBlock, Tq - i0);
        std::fill_n(m.begin(), nq, neg_inf);
        std::fill_n(l.begin(), nq, T(0));
        for (int r = 0; r < nq; ++r) std::fill_n(o + std::size_t(i0 + r) * ldo, hd, T(0));
        // Key blocks that hold some j <= i of this block's rows: those starting before its end.
        for (int j0 = 0; j0 < i0 + nq; j0 += kBlock) {
          const int nk = std::min(kBlock, i0 + nq - j0);
          tile_gemm(nq, nk, hd, scale, q + std::size_t(i0) * ld, ld, 1, kt.data() + j0, Tq,
                    S.data(), kBlock, false);
          for (int r = 0; r < nq; ++r) {
            T* row = S.data() + std::size_t(r) * kBlock;
            const int valid = std::clamp(i0 + r - j0 + 1, 0, nk);  // keys j <= i
            std::fill(row + valid, row + nk, T(0));
            if (valid == 0) continue;
            T mx = row[0];
            for (int j = 1; j < valid; ++j) mx = std::max(mx, row[j]);
            mx_all = std::max(mx_all, mx);
            const T m_new = std::max(m[r], mx);
            const T sum = exp_shifted_sum(row, valid, m_new);
            if (m[r] != m_new) {  // rescale what earlier key blocks added (nothing the first time)
              const T alpha = std::exp(m[r] - m_new);
              T* orow = o + std::size_t(i0 + r) * ldo;
              for (int c = 0; c < hd; ++c) orow[c] *= alpha;
              l[r] *= alpha;
            }
            l[r] += sum;
            m[r] = m_new;
          }
          tile_gemm(nq, hd, nk, T(1), S.data(), kBlock, 1, v + std::size_t(j0) * ld, ld,
                    o + std::size_t(i0) * ldo, ldo, true);
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
    std::vector<T> P(std::size_t(kBlock) * kBlock), dS(std::size_t(kBlock) * kBlock);
    std::vector<T> kt(std::size_t(hd) * Tq), vt(std::size_t(hd) * Tq);  // [hd, Tq] each
    std::vector<T> D(
        static_cast<std::size_t>(Tq));  // rowsum(dO * O) = rowsum(dP * P), per query row
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
          std::fill_n(dq + std::size_t(i) * ld, hd, T(0));
        }
        for (int j0 = 0; j0 < Tq; j0 += kBlock) {
          const int nk = std::min(kBlock, Tq - j0);
          // Query blocks with some row i >= j0: from the one holding row j0 to the end.
          for (int i0 = j0 / kBlock * kBlock; i0 < Tq; i0 += kBlock) {
            const int nq = std::min(kBlock, Tq - i0);
            tile_gemm(nq, nk, hd, scale, q + std::size_t(i0) * ld, ld, 1, kt.data() + j0, Tq,
                      P.data(), kBlock, false);
            tile_gemm(nq, nk, hd, T(1), dO + std::size_t(i0) * ldo, ldo, 1, vt.data() + j0, Tq,
                      dS.data(), kBlock, false);
            for (int r = 0; r < nq; ++r) {
              T* p = P.data() + std::size_t(r) * kBlock;
              T* ds = dS.data() + std::size_t(r) * kBlock;
              const int valid = std::clamp(i0 + r - j0 + 1, 0, nk);
              exp_shifted_sum(p, valid, lse_h[i0 + r]);
              const T Di = D[std::size_t(i0 + r)];
              for (int j = 0; j < valid; ++j) ds[j] = p[j] * (ds[j] - Di);
              std::fill(p + valid, p + nk, T(0));
              std::fill(ds + valid, ds + nk, T(0));
            }
            // P^T and dS^T as the left operands: a(m, k) = P[k][m].
            tile_gemm(nk, hd, nq, T(1), P.data(), 1, kBlock, dO + std::size_t(i0) * ldo, ldo,
                      dv + std::size_t(j0) * ld, ld, true);
            tile_gemm(nk, hd, nq, scale, dS.data(), 1, kBlock, q + std::size_t(i0) * ld, ld,
                      dk + std::size_t(j0) * ld, ld, true);
            tile_gemm(nq, hd, nk, scale, dS.data(), kBlock, 1, k + std::size_t(j0) * ld, ld,
                      dq + std::size_t(i0) * ld, ld, true);
          }
        }
      }
    }
  }
}

MOETRAIN_CPU_INSTANTIATE(MOETRAIN_OPS_ATTENTION)

}  // namespace moetrain::cpu
