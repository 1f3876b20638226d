// Newton-Schulz orthogonalisation (docs/design.md §4.3) of batches of same-shape matrices, shared
// by the optimizers that orthogonalise their update (Muon, NorMuon, AdaMuon): the polynomials of
// optim.ns_coefficients, Gram products through symmetric_gemm_batched, no transposes.
#pragma once

#include <cstddef>
#include <vector>

#include "moetrain/backend.hpp"
#include "moetrain/config.hpp"
#include "optim/zero1.hpp"

namespace moetrain {

// Matrices orthogonalised together at most: bounds the workspace on large models.
inline constexpr int kMaxNewtonSchulzBatch = 64;

// The workspace of one group of `matrices` same-shape matrices: X and Y hold `ws` elements each,
// S and P `s` each; the owner allocates the largest group's (the memory estimate shares this).
struct NewtonSchulzWorkspace {
  std::size_t ws = 0, s = 0;
};
NewtonSchulzWorkspace newton_schulz_workspace(int rows, int cols, std::size_t matrices);

template <typename T>
class NewtonSchulz {
 public:
  // Sized for the largest of `groups` (in batches of at most kMaxNewtonSchulzBatch).
  NewtonSchulz(const OptimConfig& o, Backend<T>& be, const std::vector<MatrixGroup>& groups);

  // Where the caller writes the `count` [rows, cols] inputs, contiguous.
  T* input() { return x_.get(); }
  // Orthogonalises them (normalised by the Frobenius norm first); returns the results, contiguous
  // [count, rows, cols], in the workspace (the caller may overwrite them until the next run).
  // The normalisation's epsilon is multiplied by eps_scale: inputs 1 / eps_scale times those of a
  // reference then normalise exactly as the reference's do.
  T* run(int rows, int cols, int count, double eps_scale = 1.0);

 private:
  const OptimConfig& o_;
  Backend<T>& be_;
  // X, Y [batch, A, B] (ping-pong), S, P [batch, m, m], m = min(A, B).
  DeviceBuffer<T, T> x_, y_, s_, p_;
};

extern template class NewtonSchulz<float>;
extern template class NewtonSchulz<double>;

}  // namespace moetrain
