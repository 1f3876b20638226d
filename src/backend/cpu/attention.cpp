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
//
// The products go through a tile policy: FloatTiles (tile_gemm on the fp32 or double data in
// place, K and V transposed) or, for the float backend's bf16 activations (train.precision =
// bf16), Bf16Tiles (tile_gemm_bf16: Q, K, V and dO packed from their bf16 storage, each tile's P
// and dS rounded to bf16, in the pair layouts of the summed dimension; fp32 accumulation, softmax
// and statistics in fp32, as the GPU's bf16 flash attention rounds P for P V). With bf16 storage O
// and dQ are summed per query block in fp32 and rounded once into the output, dK and dV once per
// task. One algorithm, two operand precisions.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "backend/cpu/lane_reduce.hpp"
#include "backend/cpu/ops.hpp"
#include "backend/cpu/tile_gemm.hpp"
#include "backend/cpu/vector_exp.hpp"

namespace moetrain::cpu {

namespace {
// Rows of a query block, and keys of a span: a [64, 256] score tile (64 KiB of fp32), the span's
// K^T and V and the block's Q and O stay in L2 while they are reused.
constexpr int kQuery = 64;
constexpr int kSpan = 256;

// The tile products of one thread's task, on the data in place: Q and dO read through their row
// strides, K and V transposed once per task so that Q K^T and dO V^T read rows. Rows are absolute
// (i0 a query block's first row, j0 a span's first key); the tile buffers S, P, dS are [nq, nk]
// at stride ls.
template <typename T>
class FloatTiles {
 public:
  explicit FloatTiles(const AttentionShape& s)
      : Tq_(s.seq),
        hd_(s.head_dim),
        ld_(s.qkv_width()),
        ldo_(s.out_width()),
        kt_(std::size_t(s.head_dim) * s.seq),
        vt_(std::size_t(s.head_dim) * s.seq) {}
  // Forward: the task's q, k, v (a head of the qkv buffer). Backward: k and v (q is per head).
  void task(const T* q, const T* k, const T* v, bool backward) {
    q_ = q, k_ = k, v_ = v;
    transpose_block(kt_.data(), k, Tq_, hd_, ld_);
    if (backward) transpose_block(vt_.data(), v, Tq_, hd_, ld_);
  }
  void head(const T* q, const T* dO) { q_ = q, dO_ = dO; }
  // S = alpha Q[i0:] K^T[:, j0:]
  void scores(T* S, int ls, int i0, int nq, int j0, int nk, T alpha) {
    tile_gemm(nq, nk, hd_, alpha, q_ + std::size_t(i0) * ld_, ld_, 1, kt_.data() + j0, Tq_, S, ls,
              false);
  }
  // dP = dO[i0:] V^T[:, j0:]
  void dprobs(T* dP, int ls, int i0, int nq, int j0, int nk) {
    tile_gemm(nq, nk, hd_, T(1), dO_ + std::size_t(i0) * ldo_, ldo_, 1, vt_.data() + j0, Tq_, dP,
              ls, false);
  }
  // O[i0:] (+)= P V[j0:]; o is the block's first row, at stride ldo
  void out(T* o, int ldo, const T* P, int ls, int nq, int j0, int nk, bool acc) {
    tile_gemm(nq, hd_, nk, T(1), P, ls, 1, v_ + std::size_t(j0) * ld_, ld_, o, ldo, acc);
  }
  // dV[j0:] += P^T dO[i0:]  (P^T as the left operand: a(m, k) = P[k][m])
  void dv(T* dv, const T* P, int ls, int i0, int nq, int j0, int nk) {
    tile_gemm(nk, hd_, nq, T(1), P, 1, ls, dO_ + std::size_t(i0) * ldo_, ldo_,
              dv + std::size_t(j0) * ld_, ld_, true);
  }
  // dK[j0:] += alpha dS^T Q[i0:]
  void dk(T* dk, const T* dS, int ls, int i0, int nq, int j0, int nk, T alpha) {
    tile_gemm(nk, hd_, nq, alpha, dS, 1, ls, q_ + std::size_t(i0) * ld_, ld_,
              dk + std::size_t(j0) * ld_, ld_, true);
  }
  // dQ[i0:] (+)= alpha dS K[j0:]; dq is the block's first row, at stride ldq
  void dq(T* dq, int ldq, const T* dS, int ls, int nq, int j0, int nk, T alpha, bool acc) {
    tile_gemm(nq, hd_, nk, alpha, dS, ls, 1, k_ + std::size_t(j0) * ld_, ld_, dq, ldq, acc);
  }
  // After a backward task's heads: dK and dV are already in place.
  void finish(T*, T*) {}

 private:
  int Tq_, hd_, ld_, ldo_;
  const T *q_ = nullptr, *k_ = nullptr, *v_ = nullptr, *dO_ = nullptr;
  std::vector<T> kt_, vt_;  // [hd, Tq] each
};

// The same products with bf16 operands (tile_gemm_bf16): each operand packed in the pair layout of
// its summed dimension, once per task (K, V), per head (Q, dO) or per tile (P, dS). "A" operands
// are [rows][pairs of the summed dimension], "B" ones [pairs][columns]; an odd count is padded
// with zeros, and i0, j0 (multiples of kQuery, kSpan) are even, so a block's pairs start at i0 / 2.
// dV and dK are summed transposed (dV^T += dO^T P, dK^T += Q^T dS, into per-task fp32 [hd, Tq]
// buffers written out by finish), so that every per-tile pack reads P and dS by rows.
class Bf16Tiles {
 public:
  explicit Bf16Tiles(const AttentionShape& s)
      : Tq_(s.seq),
        hd_(s.head_dim),
        h2_((s.head_dim + 1) / 2),
        t2_((s.seq + 1) / 2),
        ld_(s.qkv_width()),
        ldo_(s.out_width()),
        qa_(buf(s.seq, h2_)),
        qta_(buf(hd_, t2_)),
        doa_(buf(s.seq, h2_)),
        dota_(buf(hd_, t2_)),
        ktb_(buf(h2_, s.seq)),
        vtb_(buf(h2_, s.seq)),
        kb_(buf(t2_, hd_)),
        vb_(buf(t2_, hd_)),
        pa_(buf(kQuery, kSpan / 2)),
        pb_(buf(kQuery / 2, kSpan)),
        dkt_(std::size_t(hd_) * s.seq),
        dvt_(dkt_.size()) {}
  void task(const bf16* q, const bf16* k, const bf16* v, bool backward) {
    pack_pairs_b(ktb_.data(), Tq_, k, 1, ld_, hd_, Tq_);  // K^T: pairs of head dims, keys
    if (backward) {
      pack_pairs_b(vtb_.data(), Tq_, v, 1, ld_, hd_, Tq_);  // V^T
      pack_pairs_b(kb_.data(), hd_, k, ld_, 1, Tq_, hd_);   // K: pairs of keys, head dims
      std::fill(dkt_.begin(), dkt_.end(), 0.0f);
      std::fill(dvt_.begin(), dvt_.end(), 0.0f);
    } else {
      pack_pairs_a(qa_.data(), h2_, q, ld_, 1, Tq_, hd_);  // Q: rows, pairs of head dims
      pack_pairs_b(vb_.data(), hd_, v, ld_, 1, Tq_, hd_);  // V: pairs of keys, head dims
    }
  }
  void head(const bf16* q, const bf16* dO) {
    pack_pairs_a(qa_.data(), h2_, q, ld_, 1, Tq_, hd_);
    pack_pairs_a(qta_.data(), t2_, q, 1, ld_, hd_, Tq_);  // Q^T: head dims, pairs of query rows
    pack_pairs_a(doa_.data(), h2_, dO, ldo_, 1, Tq_, hd_);
    pack_pairs_a(dota_.data(), t2_, dO, 1, ldo_, hd_, Tq_);  // dO^T
  }
  void scores(float* S, int ls, int i0, int nq, int j0, int nk, float alpha) {
    tile_gemm_bf16(nq, nk, h2_, alpha, qa_.data() + std::size_t(i0) * h2_, h2_, ktb_.data() + j0,
                   Tq_, S, ls, false);
  }
  void dprobs(float* dP, int ls, int i0, int nq, int j0, int nk) {
    tile_gemm_bf16(nq, nk, h2_, 1.0f, doa_.data() + std::size_t(i0) * h2_, h2_, vtb_.data() + j0,
                   Tq_, dP, ls, false);
  }
  void out(float* o, int ldo, const float* P, int ls, int nq, int j0, int nk, bool acc) {
    const int k2 = (nk + 1) / 2;
    pack_pairs_a(pa_.data(), k2, P, ls, 1, nq, nk);  // P: query rows, pairs of keys
    tile_gemm_bf16(nq, hd_, k2, 1.0f, pa_.data(), k2, vb_.data() + std::size_t(j0 / 2) * hd_, hd_,
                   o, ldo, acc);
  }
  // dV^T[:, j0:] += dO^T[:, i0:] P
  void dv(bf16*, const float* P, int ls, int i0, int nq, int j0, int nk) {
    const int q2 = (nq + 1) / 2;
    pack_pairs_b(pb_.data(), nk, P, ls, 1, nq, nk);  // P: pairs of query rows, keys
    tile_gemm_bf16(hd_, nk, q2, 1.0f, dota_.data() + i0 / 2, t2_, pb_.data(), nk, dvt_.data() + j0,
                   Tq_, true);
  }
  // dK^T[:, j0:] += alpha Q^T[:, i0:] dS
  void dk(bf16*, const float* dS, int ls, int i0, int nq, int j0, int nk, float alpha) {
    const int q2 = (nq + 1) / 2;
    pack_pairs_b(pb_.data(), nk, dS, ls, 1, nq, nk);
    tile_gemm_bf16(hd_, nk, q2, alpha, qta_.data() + i0 / 2, t2_, pb_.data(), nk, dkt_.data() + j0,
                   Tq_, true);
  }
  void dq(float* dq, int ldq, const float* dS, int ls, int nq, int j0, int nk, float alpha,
          bool acc) {
    const int k2 = (nk + 1) / 2;
    pack_pairs_a(pa_.data(), k2, dS, ls, 1, nq, nk);  // dS: query rows, pairs of keys
    tile_gemm_bf16(nq, hd_, k2, alpha, pa_.data(), k2, kb_.data() + std::size_t(j0 / 2) * hd_, hd_,
                   dq, ldq, acc);
  }
  // dK, dV [Tq, hd] at stride ld from their transposed sums, rounded once.
  void finish(bf16* dk, bf16* dv) {
    transpose_block(dk, ld_, dkt_.data(), hd_, Tq_, Tq_);
    transpose_block(dv, ld_, dvt_.data(), hd_, Tq_, Tq_);
  }

 private:
  static std::vector<std::uint32_t> buf(int rows, int cols) {
    return std::vector<std::uint32_t>(std::size_t(rows) * std::size_t(cols));
  }
  int Tq_, hd_, h2_, t2_, ld_, ldo_;
  std::vector<std::uint32_t> qa_, qta_, doa_, dota_;  // per head
  std::vector<std::uint32_t> ktb_, vtb_, kb_, vb_;    // per task
  std::vector<std::uint32_t> pa_, pb_;                // per tile: P or dS as A, as B
  std::vector<float> dkt_, dvt_;                      // [hd, Tq]: dK^T and dV^T of the task
};

// The tile policy of activations A with math type T.
template <typename T, typename A>
using TilesFor = std::conditional_t<std::is_same_v<A, bf16>, Bf16Tiles, FloatTiles<T>>;

// Rows [0, nq) of an fp32 block (stride hd) into the output's rows (stride ld), rounded once.
template <typename A>
void store_block(A* dst, int ld, const float* src, int nq, int hd) {
  for (int r = 0; r < nq; ++r)
    for (int c = 0; c < hd; ++c) dst[std::size_t(r) * ld + c] = A(src[std::size_t(r) * hd + c]);
}

// Where a query block's sums of O (dQ) go, and their stride: the output's rows in place when A is
// the math type T; otherwise the thread's fp32 block of kQuery rows, which store_block then
// rounds into the output (`direct` false).
template <typename T, typename A>
std::pair<T*, int> block_sums(A* rows, int ld, std::vector<T>& block, int hd) {
  if constexpr (std::is_same_v<A, T>)
    return {rows, ld};
  else
    return {block.data(), hd};
}

template <typename T, typename A>
void forward_with(A* out, T* lse, T* smax, const A* qkv, const AttentionShape& s) {
  using Tiles = TilesFor<T, A>;
  constexpr bool direct = std::is_same_v<A, T>;
  const int Tq = s.seq, hd = s.head_dim, ld = s.qkv_width(), ldo = s.out_width();
  const int group = s.n_heads / s.n_kv_heads;
  const T scale = T(1.0 / std::sqrt(double(hd)));
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int tasks = s.batch * s.n_heads;
  std::vector<T> head_max(std::size_t(tasks), neg_inf);

#pragma omp parallel
  {
    Tiles tiles(s);
    std::vector<T> S(std::size_t(kQuery) * kSpan);  // [kQuery q rows, kSpan keys]
    std::vector<T> m(kQuery), l(kQuery);            // running row max and sum of the block
    std::vector<T> oblock(direct ? 0 : std::size_t(kQuery) * hd);  // [kQuery, hd]
#pragma omp for schedule(static)
    for (int task = 0; task < tasks; ++task) {
      const int b = task / s.n_heads, h = task % s.n_heads, g = h / group;
      const A* base = qkv + std::size_t(b) * Tq * ld;
      A* o = out + std::size_t(b) * Tq * ldo + std::size_t(h) * hd;  // [Tq, hd] at stride ldo
      T* lse_h = lse + std::size_t(task) * Tq;
      tiles.task(base + std::size_t(h) * hd, base + std::size_t(s.n_heads + g) * hd,
                 base + std::size_t(s.n_heads + s.n_kv_heads + g) * hd, false);
      T mx_all = neg_inf;
      for (int i0 = 0; i0 < Tq; i0 += kQuery) {
        const int nq = std::min(kQuery, Tq - i0), end = i0 + nq;  // keys j < end
        std::fill_n(m.begin(), nq, neg_inf);
        std::fill_n(l.begin(), nq, T(0));
        const auto [ob, ldb] = block_sums(o + std::size_t(i0) * ldo, ldo, oblock, hd);  // O
        for (int j0 = 0; j0 < end; j0 += kSpan) {
          const int nk = std::min(kSpan, end - j0);
          tiles.scores(S.data(), kSpan, i0, nq, j0, nk, scale);
          for (int r = 0; r < nq; ++r) {
            T* row = S.data() + std::size_t(r) * kSpan;
            const int valid = std::clamp(i0 + r - j0 + 1, 0, nk);  // keys j <= i
            std::fill(row + valid, row + nk, T(0));
            if (valid == 0) continue;
            const T mx = row_max<T>(row, valid);
            mx_all = std::max(mx_all, mx);
            const T m_new = std::max(m[r], mx);
            const T sum = exp_shifted_sum(row, valid, m_new);
            if (j0 > 0 && m[r] != m_new) {  // rescale what earlier spans added
              const T alpha = std::exp(m[r] - m_new);
              T* orow = ob + std::size_t(r) * ldb;
              for (int c = 0; c < hd; ++c) orow[c] *= alpha;
              l[r] *= alpha;
            }
            l[r] += sum;
            m[r] = m_new;
          }
          tiles.out(ob, ldb, S.data(), kSpan, nq, j0, nk, j0 > 0);  // the first span writes O
        }
        for (int r = 0; r < nq; ++r) {
          const T inv = T(1) / l[r];
          T* orow = ob + std::size_t(r) * ldb;
          for (int c = 0; c < hd; ++c) orow[c] *= inv;
          lse_h[i0 + r] = m[r] + std::log(l[r]);
        }
        if constexpr (!direct) store_block(o + std::size_t(i0) * ldo, ldo, ob, nq, hd);
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

template <typename T, typename A>
void backward_with(A* dqkv, const A* dout, const A* qkv, const A* out, const T* lse,
                   const AttentionShape& s) {
  using Tiles = TilesFor<T, A>;
  constexpr bool direct = std::is_same_v<A, T>;
  const int Tq = s.seq, hd = s.head_dim, ld = s.qkv_width(), ldo = s.out_width();
  const int group = s.n_heads / s.n_kv_heads;
  const T scale = T(1.0 / std::sqrt(double(hd)));
  const int tasks = s.batch * s.n_kv_heads;

#pragma omp parallel
  {
    Tiles tiles(s);
    // [kQuery q rows, kSpan keys] each
    std::vector<T> P(std::size_t(kQuery) * kSpan), dS(std::size_t(kQuery) * kSpan);
    std::vector<T> D(static_cast<std::size_t>(Tq));  // rowsum(dO * O) = rowsum(dP * P), per row
    std::vector<T> qblock(direct ? 0 : std::size_t(kQuery) * hd);  // [kQuery, hd]: dQ's block
#pragma omp for schedule(static)
    for (int task = 0; task < tasks; ++task) {
      const int b = task / s.n_kv_heads, g = task % s.n_kv_heads;
      const std::size_t row0 = std::size_t(b) * Tq;
      const A* base = qkv + row0 * ld;
      A* dbase = dqkv + row0 * ld;
      A* dk = dbase + std::size_t(s.n_heads + g) * hd;
      A* dv = dbase + std::size_t(s.n_heads + s.n_kv_heads + g) * hd;
      tiles.task(nullptr, base + std::size_t(s.n_heads + g) * hd,
                 base + std::size_t(s.n_heads + s.n_kv_heads + g) * hd, true);
      for (int i = 0; i < Tq; ++i) {
        std::fill_n(dk + std::size_t(i) * ld, hd, A(T(0)));
        std::fill_n(dv + std::size_t(i) * ld, hd, A(T(0)));
      }
      for (int h = g * group; h < (g + 1) * group; ++h) {
        A* dq = dbase + std::size_t(h) * hd;
        const A* dO = dout + row0 * ldo + std::size_t(h) * hd;
        const A* O = out + row0 * ldo + std::size_t(h) * hd;
        const T* lse_h = lse + (std::size_t(b) * s.n_heads + h) * Tq;
        tiles.head(base + std::size_t(h) * hd, dO);
        for (int i = 0; i < Tq; ++i) {
          const A* a = dO + std::size_t(i) * ldo;
          const A* c = O + std::size_t(i) * ldo;
          D[std::size_t(i)] = lane_sum<T>(0, hd, [&](int e) { return T(a[e]) * T(c[e]); });
        }
        for (int i0 = 0; i0 < Tq; i0 += kQuery) {
          const int nq = std::min(kQuery, Tq - i0), end = i0 + nq;
          const auto [qb, ldb] = block_sums(dq + std::size_t(i0) * ld, ld, qblock, hd);  // dQ
          for (int j0 = 0; j0 < end; j0 += kSpan) {
            const int nk = std::min(kSpan, end - j0);
            tiles.scores(P.data(), kSpan, i0, nq, j0, nk, scale);
            tiles.dprobs(dS.data(), kSpan, i0, nq, j0, nk);
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
            tiles.dv(dv, P.data(), kSpan, i0, nq, j0, nk);
            tiles.dk(dk, dS.data(), kSpan, i0, nq, j0, nk, scale);
            // The first span writes the block's dQ, later ones add to it.
            tiles.dq(qb, ldb, dS.data(), kSpan, nq, j0, nk, scale, j0 > 0);
          }
          if constexpr (!direct) store_block(dq + std::size_t(i0) * ld, ld, qb, nq, hd);
        }
      }
      tiles.finish(dk, dv);
    }
  }
}
}  // namespace

std::size_t attention_saved_elems(const AttentionShape& s) {
  return std::size_t(s.batch) * std::size_t(s.n_heads) * std::size_t(s.seq);  // logsumexp
}

template <typename T, typename A>
void attention_forward(A* out, T* lse, T* smax, const A* qkv, const AttentionShape& s) {
  forward_with<T, A>(out, lse, smax, qkv, s);
}

template <typename T, typename A>
void attention_backward(A* dqkv, const A* dout, const A* qkv, const A* out, const T* lse,
                        const AttentionShape& s) {
  backward_with<T, A>(dqkv, dout, qkv, out, lse, s);
}

MOETRAIN_CPU_INSTANTIATE_ACT(MOETRAIN_OPS_ATTENTION)

}  // namespace moetrain::cpu
