#include "optim/newton_schulz.hpp"

#include <algorithm>
#include <utility>

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

}  // namespace

NewtonSchulzWorkspace newton_schulz_workspace(int rows, int cols, std::size_t matrices) {
  const std::size_t elems = std::size_t(rows) * std::size_t(cols);
  const std::size_t small = std::size_t(std::min(rows, cols));
  const std::size_t batch = std::min<std::size_t>(matrices, kMaxNewtonSchulzBatch);
  return {elems * batch, small * small * batch};
}

template <typename T>
NewtonSchulz<T>::NewtonSchulz(const OptimConfig& o, Backend<T>& be,
                              const std::vector<MatrixGroup>& groups)
    : o_(o), be_(be) {
  std::size_t max_ws = 0, max_s = 0;
  for (const MatrixGroup& g : groups) {
    const NewtonSchulzWorkspace w = newton_schulz_workspace(g.rows, g.cols, g.mats.size());
    max_ws = std::max(max_ws, w.ws);
    max_s = std::max(max_s, w.s);
  }
  x_ = DeviceBuffer<T, T>(be_, max_ws);
  y_ = DeviceBuffer<T, T>(be_, max_ws);
  s_ = DeviceBuffer<T, T>(be_, max_s);
  p_ = DeviceBuffer<T, T>(be_, max_s);
}

template <typename T>
T* NewtonSchulz<T>::run(int A, int B, int count, double eps_scale) {
  const std::size_t elems = std::size_t(A) * B;
  // Newton-Schulz iterates on the wide orientation (the Gram matrix over the smaller side). A tall
  // matrix (A > B) stays stored [A, B]: its Gram matrix is X^T X and its product X P, so nothing
  // is transposed.
  const bool tall = A > B;
  const int m = std::min(A, B), wide = std::max(A, B);
  const std::size_t mm = std::size_t(m) * m;
  const bool pe = o_.ns_coefficients == NsCoefficients::PolarExpress;
  be_.frobenius_normalize(x_.get(), count, elems, pe ? 1.02 : 1.0, (pe ? 1e-6 : 1e-7) * eps_scale);
  T *X = x_.get(), *Y = y_.get();
  T *S = s_.get(), *P = p_.get();
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
  return X;
}

template class NewtonSchulz<float>;
template class NewtonSchulz<double>;

}  // namespace moetrain
