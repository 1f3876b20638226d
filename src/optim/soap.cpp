#include "optim/soap.hpp"

#include <algorithm>
#include <cmath>

namespace moetrain {

namespace {

bool rotates(const OptimConfig& o, int side) {
  return side <= o.soap_max_precond_dim;
}

}  // namespace

SoapSizes soap_sizes(const OptimConfig& o, int rows, int cols, std::size_t matrices) {
  const std::size_t A = std::size_t(rows), B = std::size_t(cols);
  const std::size_t l = rotates(o, rows) ? A * A : 0, r = rotates(o, cols) ? B * B : 0;
  const std::size_t batch = std::min<std::size_t>(matrices, kMaxSoapBatch);
  return {matrices * (2 * A * B + 2 * l + 2 * r), batch * A * B, batch * std::max(l, r)};
}

template <typename T>
Soap<T>::Soap(const OptimConfig& o, Zero1Plan<T>& plan)
    : o_(o),
      plan_(plan),
      be_(plan.backend()),
      shampoo_beta_(o.soap_shampoo_beta < 0 ? o.soap_beta2 : o.soap_shampoo_beta) {
  std::size_t total = 0, ab = 0, sq = 0;
  for (const MatrixGroup& g : plan.own_groups()) {
    const std::size_t n = g.mats.size(), A = std::size_t(g.rows), B = std::size_t(g.cols);
    GroupState s{rotates(o, g.rows), rotates(o, g.cols), 0, 0, 0, 0, 0, 0};
    s.m = total;
    s.v = s.m + n * A * B;
    s.L = s.v + n * A * B;
    s.R = s.L + (s.left ? n * A * A : 0);
    s.QL = s.R + (s.right ? n * B * B : 0);
    s.QR = s.QL + (s.left ? n * A * A : 0);
    total = s.QR + (s.right ? n * B * B : 0);
    groups_.push_back(s);
    const SoapSizes z = soap_sizes(o, g.rows, g.cols, n);
    ab = std::max(ab, z.workspace_ab);
    sq = std::max(sq, z.workspace_sq);
  }
  state_ = DeviceBuffer<T, T>(be_, total);
  for (auto* b : {&g_, &gt_, &mt_, &tmp_}) *b = DeviceBuffer<T, T>(be_, ab);
  sq1_ = DeviceBuffer<T, T>(be_, sq);
  sq2_ = DeviceBuffer<T, T>(be_, sq);
}

template <typename T>
void Soap<T>::step(T* params, double lr, std::int64_t t, const double* gate, double* acc) {
  transformed_ = 0;
  const std::vector<MatrixGroup>& groups = plan_.own_groups();
  for (std::size_t gi = 0; gi < groups.size(); ++gi)
    for (std::size_t first = 0; first < groups[gi].mats.size(); first += kMaxSoapBatch) {
      const int count = int(std::min<std::size_t>(kMaxSoapBatch, groups[gi].mats.size() - first));
      batch(gi, first, count, params, lr, t, gate, acc);
      transformed_ += count;
    }
}

template <typename T>
void Soap<T>::rotate(T* out, const T* in, T* tmp, const T* QL, const T* QR, const GroupState& s,
                     int A, int B, int count, bool forward) {
  const std::size_t ab = std::size_t(A) * B, aa = std::size_t(A) * A, bb = std::size_t(B) * B;
  const T* mid = in;
  if (s.left) {
    // tmp = Q_L^T in (forward) or Q_L in.
    be_.gemm_batched(forward, false, A, B, A, T(1), QL, A, aa, in, B, ab, T(0), tmp, B, ab, count);
    mid = tmp;
  }
  if (s.right)  // out = mid Q_R (forward) or mid Q_R^T
    be_.gemm_batched(false, !forward, A, B, B, T(1), mid, B, ab, QR, B, bb, T(0), out, B, ab,
                     count);
  else
    be_.copy(out, mid, std::size_t(count) * ab * sizeof(T));
}

template <typename T>
void Soap<T>::batch(std::size_t gi, std::size_t first, int count, T* params, double lr,
                    std::int64_t t, const double* gate, double* acc) {
  const MatrixGroup& g = plan_.own_groups()[gi];
  const GroupState& s = groups_[gi];
  const int A = g.rows, B = g.cols;
  const std::size_t ab = std::size_t(A) * B, aa = std::size_t(A) * A, bb = std::size_t(B) * B;
  const std::size_t cab = std::size_t(count) * ab;
  T* base = state_.get();
  T* m = base + s.m + first * ab;
  T* v = base + s.v + first * ab;
  T* L = base + s.L + first * aa;
  T* R = base + s.R + first * bb;
  T* QL = base + s.QL + first * aa;
  T* QR = base + s.QR + first * bb;
  T* G = g_.get();
  for (int i = 0; i < count; ++i)
    be_.copy(G + std::size_t(i) * ab,
             plan_.matrix_grad(plan_.matrices()[g.mats[first + std::size_t(i)]]), ab * sizeof(T));

  const std::int64_t ts = t - 1;  // the reference's step count
  if (ts >= 1) {
    T *Gt = gt_.get(), *Mt = mt_.get(), *tmp = tmp_.get();
    rotate(Gt, G, tmp, QL, QR, s, A, B, count, true);
    be_.lerp_update(m, G, cab, o_.soap_beta1, gate);
    rotate(Mt, m, tmp, QL, QR, s, A, B, count, true);
    be_.soap_precondition(Mt, v, Mt, Gt, cab, o_.soap_beta2, o_.eps, gate);
    rotate(Gt, Mt, tmp, QL, QR, s, A, B, count, false);  // N
    // The reference decays after the step, W = (W - lr c N)(1 - lr wd), which is
    // W - lr (c (1 - lr wd) N + wd W): muon_update's form with that scale.
    const double wd = o_.muon_group.weight_decay;
    const double c = std::sqrt(1 - std::pow(o_.soap_beta2, double(ts))) /
                     (1 - std::pow(o_.soap_beta1, double(ts)));
    for (int i = 0; i < count; ++i)
      be_.muon_update(params + plan_.matrices()[g.mats[first + std::size_t(i)]].offset,
                      Gt + std::size_t(i) * ab, ab, lr, c * (1 - lr * wd), wd, gate, acc);
  }

  // The factors (from zero on the first step: L = (1 - bs) G G^T), through the workspace so that a
  // skipped step leaves them as they were.
  T *S1 = sq1_.get(), *S2 = sq2_.get();
  const bool refresh = ts >= 1 && ts % o_.soap_precondition_frequency == 0;
  struct Side {
    bool on;
    int n;
    T *P, *Q;
  };
  const Side sides[2] = {{s.left, A, L, QL}, {s.right, B, R, QR}};
  for (int k = 0; k < 2; ++k) {
    const Side& sd = sides[k];
    if (!sd.on) continue;
    const std::size_t nn = std::size_t(sd.n) * sd.n;
    // G G^T (left) or G^T G (right) as a general product, not symmetric_gemm_batched: the GPU's
    // Gram kernel rounds its operands to bf16 (right for Newton-Schulz), and an eigenbasis is as
    // sensitive as the gaps of its factor are small, so SOAP's factors take the backend's GEMM
    // precision (fp32 in fp32 mode; docs/design.md §4.6).
    be_.gemm_batched(k == 1, k == 0, sd.n, sd.n, k == 0 ? B : A, T(1), G, B, ab, G, B, ab, T(0), S1,
                     sd.n, nn, count);
    be_.lerp_update(sd.P, S1, std::size_t(count) * nn, shampoo_beta_, gate);
    if (ts == 0) {
      be_.symmetric_eigenvectors_batched(S2, sd.P, sd.n, count);
      be_.lerp_update(sd.Q, S2, std::size_t(count) * nn, 0.0, gate);
    } else if (refresh) {
      // P Q, its columns in the order of descending Q^T P Q diagonal (v permuted alike), then QR.
      be_.gemm_batched(false, false, sd.n, sd.n, sd.n, T(1), sd.P, sd.n, nn, sd.Q, sd.n, nn, T(0),
                       S1, sd.n, nn, count);
      T* v_perm = mt_.get();
      be_.sort_eigenbasis(S2, v_perm, sd.Q, S1, v, sd.n, count, A, B, k == 0);
      be_.qr_orthonormalize_batched(S1, S2, sd.n, count);
      be_.lerp_update(sd.Q, S1, std::size_t(count) * nn, 0.0, gate);
      be_.lerp_update(v, v_perm, cab, 0.0, gate);
    }
  }
}

template <typename T>
std::vector<StateTensor<T>> Soap<T>::state() {
  std::vector<StateTensor<T>> out;
  const std::vector<MatrixGroup>& groups = plan_.own_groups();
  T* base = state_.get();
  for (std::size_t gi = 0; gi < groups.size(); ++gi) {
    const GroupState& s = groups_[gi];
    for (std::size_t k = 0; k < groups[gi].mats.size(); ++k) {
      const OwnedMatrix& mt = plan_.matrices()[groups[gi].mats[k]];
      const std::int64_t A = mt.rows, B = mt.cols;
      const std::size_t ab = mt.elems(), aa = std::size_t(A * A), bb = std::size_t(B * B);
      out.push_back({"soap.m." + mt.name, base + s.m + k * ab, ab, {A, B}});
      out.push_back({"soap.v." + mt.name, base + s.v + k * ab, ab, {A, B}});
      if (s.left) {
        out.push_back({"soap.L." + mt.name, base + s.L + k * aa, aa, {A, A}});
        out.push_back({"soap.QL." + mt.name, base + s.QL + k * aa, aa, {A, A}});
      }
      if (s.right) {
        out.push_back({"soap.R." + mt.name, base + s.R + k * bb, bb, {B, B}});
        out.push_back({"soap.QR." + mt.name, base + s.QR + k * bb, bb, {B, B}});
      }
    }
  }
  return out;
}

template class Soap<float>;
template class Soap<double>;

}  // namespace moetrain
