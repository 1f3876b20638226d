#include "optim/muon.hpp"

#include <algorithm>
#include <cmath>

namespace moetrain {

namespace {

// Newton-Schulz quintics x -> a x + b x^3 + c x^5 (optim.ns_coefficients).
struct Quintic {
  double a, b, c;
};
// Muon's, every iteration, after X / (||X||_F + 1e-7).
constexpr Quintic kMuonQuintic{3.4445, -4.7750, 2.0315};
// Polar Express (arXiv 2505.16932), the list of modded-nanogpt's and Dion's polar_express: its
// safety factor 1.02 is built into the first four and applied in the normalisation
// X / (1.02 ||X||_F + 1e-6). ../shared/OPTIMIZERS.md §1.
constexpr Quintic kPolarExpress[] = {
    {8.156554524902461, -22.48329292557795, 15.878769915207462},
    {4.042929935166739, -2.808917465908714, 0.5000178451051316},
    {3.8916678022926607, -2.772484153217685, 0.5060648178503393},
    {3.285753657755655, -2.3681294933425376, 0.46449024233003106},
    {2.3465413258596377, -1.7097828382687081, 0.42323551169305323},
};
constexpr int kPolarExpressSteps = int(sizeof kPolarExpress / sizeof kPolarExpress[0]);

// Iteration `it`'s polynomial; Polar Express repeats its last (its converged regime) past five.
Quintic quintic(NsCoefficients c, int it) {
  if (c == NsCoefficients::Muon) return kMuonQuintic;
  return kPolarExpress[std::min(it, kPolarExpressSteps - 1)];
}
// Matrices orthogonalised together at most: bounds the workspace on large models.
constexpr int kMaxBatch = 64;

}  // namespace

MuonWorkspace muon_workspace(int rows, int cols, std::size_t matrices) {
  const std::size_t elems = std::size_t(rows) * std::size_t(cols);
  const std::size_t small = std::size_t(std::min(rows, cols));
  const std::size_t batch = std::min<std::size_t>(matrices, kMaxBatch);
  return {elems * batch, small * small * batch};
}

template <typename T>
Muon<T>::Muon(const OptimConfig& o, Zero1Plan<T>& plan) : o_(o), plan_(plan), be_(plan.backend()) {
  std::size_t max_ws = 0, max_s = 0;
  for (const MatrixGroup& g : plan.own_groups()) {
    const MuonWorkspace w = muon_workspace(g.rows, g.cols, g.mats.size());
    max_ws = std::max(max_ws, w.ws);
    max_s = std::max(max_s, w.s);
  }
  momentum_ = DeviceBuffer<T, T>(be_, plan.own_elems());
  ws_x_ = DeviceBuffer<T, T>(be_, max_ws);
  ws_y_ = DeviceBuffer<T, T>(be_, max_ws);
  ws_s_ = DeviceBuffer<T, T>(be_, max_s);
  ws_p_ = DeviceBuffer<T, T>(be_, max_s);
}

template <typename T>
void Muon<T>::step(T* params, double lr, std::int64_t, const double* gate, double* acc) {
  orthogonalised_ = 0;
  for (const MatrixGroup& g : plan_.own_groups())
    for (std::size_t first = 0; first < g.mats.size(); first += kMaxBatch)
      batch(g, first, int(std::min<std::size_t>(kMaxBatch, g.mats.size() - first)), params, lr,
            gate, acc);
}

template <typename T>
void Muon<T>::batch(const MatrixGroup& g, std::size_t first, int count, T* params, double lr,
                    const double* gate, double* acc) {
  const int A = g.rows, B = g.cols;
  const std::size_t elems = std::size_t(A) * B;
  // Newton-Schulz iterates on the wide orientation (the Gram matrix over the smaller side). A tall
  // matrix (A > B) stays stored [A, B]: its Gram matrix is X^T X and its product X P, so nothing
  // is transposed.
  const bool tall = A > B;
  const int m = std::min(A, B), wide = std::max(A, B);
  const std::size_t mm = std::size_t(m) * m;
  const std::vector<OwnedMatrix>& mats = plan_.matrices();
  orthogonalised_ += count;

  // Momentum per matrix (its state sits at its slot); the update direction U into X, contiguous.
  for (int i = 0; i < count; ++i) {
    const OwnedMatrix& mt = mats[g.mats[first + std::size_t(i)]];
    be_.muon_momentum(momentum_.get() + mt.slot, ws_x_.get() + std::size_t(i) * elems,
                      plan_.matrix_grad(mt), elems, o_.momentum, o_.nesterov, gate);
  }
  const bool pe = o_.ns_coefficients == NsCoefficients::PolarExpress;
  be_.frobenius_normalize(ws_x_.get(), count, elems, pe ? 1.02 : 1.0, pe ? 1e-6 : 1e-7);
  T *X = ws_x_.get(), *Y = ws_y_.get();
  T *S = ws_s_.get(), *P = ws_p_.get();
  const T* none = nullptr;
  for (int it = 0; it < o_.ns_steps; ++it) {
    const Quintic q = quintic(o_.ns_coefficients, it);
    // S = X X^T (wide); P = c S S + b S + a I (S is symmetric: S S is its Gram matrix too);
    // Y = P X (wide), i.e. X P when tall: X_{k+1} = a X + b S X + c S^2 X.
    be_.symmetric_gemm_batched(tall, m, wide, T(1), X, B, elems, T(0), none, m, mm, T(0), S, m, mm,
                               count);
    be_.symmetric_gemm_batched(false, m, m, T(q.c), S, m, mm, T(q.b), S, m, mm, T(q.a), P, m, mm,
                               count);
    if (tall)
      be_.gemm_batched(false, false, A, B, B, T(1), X, B, elems, P, B, mm, T(0), Y, B, elems,
                       count);
    else
      be_.gemm_batched(false, false, A, B, A, T(1), P, A, mm, X, B, elems, T(0), Y, B, elems,
                       count);
    std::swap(X, Y);
  }
  const T* O = X;
  const double scale = o_.muon_scale == MuonScale::Original
                           ? std::sqrt(std::max(1.0, double(A) / double(B)))
                           : 0.2 * std::sqrt(double(std::max(A, B)));
  for (int i = 0; i < count; ++i)
    be_.muon_update(params + mats[g.mats[first + std::size_t(i)]].offset,
                    O + std::size_t(i) * elems, elems, lr, scale, o_.muon_group.weight_decay, gate,
                    acc);
}

template <typename T>
std::vector<StateTensor<T>> Muon<T>::state() {
  std::vector<StateTensor<T>> out;
  for (const MatrixGroup& g : plan_.own_groups())
    for (std::size_t i : g.mats) {
      const OwnedMatrix& mt = plan_.matrices()[i];
      out.push_back(
          {"muon.momentum." + mt.name, momentum_.get() + mt.slot, mt.elems(), {mt.rows, mt.cols}});
    }
  return out;
}

template class Muon<float>;
template class Muon<double>;

}  // namespace moetrain
