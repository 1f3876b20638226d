// SOAP (arXiv 2409.11321; ../shared/OPTIMIZERS.md §4, after the reference soap.py) on the
// matrices this rank owns: Adam run in the eigenbasis of the Shampoo factors L = EMA(G G^T) and
// R = EMA(G^T G). Per matrix W [A, B] and step t (the reference's count: one less than the
// optimizer's, whose first step only initialises L, R and their bases Q_L, Q_R):
//   G~ = Q_L^T G Q_R; m = b1 m + (1 - b1) G; v = b2 v + (1 - b2) G~^2;
//   N = Q_L ((Q_L^T m Q_R) / (sqrt(v) + eps)) Q_R^T;
//   W = (W - lr sqrt(1 - b2^t) / (1 - b1^t) N) (1 - lr wd);
//   L = bs L + (1 - bs) G G^T, R likewise; every precondition_frequency steps each basis is
//   refreshed by one power iteration, Q = qr(P Q) with Q's columns (and v's rows or columns)
//   first ordered by descending Q^T P Q diagonal.
// m is kept in the original basis: the reference keeps it rotated and rotates it back and forth
// around each refresh, which is the same EMA (Q is orthogonal) at two more products per step.
// A side longer than optim.soap_max_precond_dim is not rotated (its Q is the identity). The
// first step's bases come from eigendecompositions (LAPACK ?syevd, cuSOLVER), batched over
// same-shape matrices.
#pragma once

#include "optim/update_rule.hpp"

namespace moetrain {

// Matrices handled together at most: bounds the workspace.
inline constexpr int kMaxSoapBatch = 16;

// Elements of SOAP's state and of its workspace for `matrices` [rows, cols] matrices (the state of
// all of them; the workspace of one batch), shared with the memory estimate.
struct SoapSizes {
  std::size_t state = 0, workspace_ab = 0, workspace_sq = 0;
};
SoapSizes soap_sizes(const OptimConfig& o, int rows, int cols, std::size_t matrices);

template <typename T>
class Soap final : public MatrixOptimizer<T> {
 public:
  Soap(const OptimConfig& o, Zero1Plan<T>& plan);

  void step(T* params, double lr, std::int64_t t, const double* gate, double* acc) override;
  std::vector<StateTensor<T>> state() override;
  int transformed_last_step() const override { return transformed_; }

 private:
  // Per group: where each piece of its state starts (its matrices contiguous).
  struct GroupState {
    bool left, right;  // whether rows / columns are rotated
    std::size_t m, v, L, R, QL, QR;
  };
  // One batch of `count` matrices of group gi from index `first`.
  void batch(std::size_t gi, std::size_t first, int count, T* params, double lr, std::int64_t t,
             const double* gate, double* acc);
  // out = Q_L^T in Q_R (forward) or Q_L in Q_R^T, through tmp; the unrotated sides copy.
  void rotate(T* out, const T* in, T* tmp, const T* QL, const T* QR, const GroupState& s, int A,
              int B, int count, bool forward);

  const OptimConfig& o_;
  Zero1Plan<T>& plan_;
  Backend<T>& be_;
  double shampoo_beta_;
  std::vector<GroupState> groups_;
  DeviceBuffer<T, T> state_;
  // Workspace of one batch: G, G~, m~ (then m~ / (sqrt(v) + eps), then v's permutation), tmp
  // [batch, A, B]; two [batch, n, n] for the factors' products, n = the longer rotated side.
  DeviceBuffer<T, T> g_, gt_, mt_, tmp_, sq1_, sq2_;
  int transformed_ = 0;
};

extern template class Soap<float>;
extern template class Soap<double>;

}  // namespace moetrain
