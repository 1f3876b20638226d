// What the optimizer's update rules share: their state as named device buffers (for checkpoints),
// and the interface of the matrix group's rule, so a new matrix optimizer (NorMuon, AdaMuon, SOAP)
// is one file implementing MatrixOptimizer plus its config enum value (docs/design.md §10).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "optim/zero1.hpp"

namespace moetrain {

// One piece of this rank's optimizer state: `count` elements at `data` (device), saved as the
// checkpoint tensor `name` of `shape`.
template <typename T>
struct StateTensor {
  std::string name;
  T* data;
  std::size_t count;
  std::vector<std::int64_t> shape;
};

// Per-matrix state laid out group by group, each group's matrices contiguous (so a batch of them
// is one strided buffer): the offset of each group's first matrix, `per_matrix(rows, cols)`
// elements per matrix; the total is the last entry.
template <typename F>
std::vector<std::size_t> group_state_offsets(const std::vector<MatrixGroup>& groups, F per_matrix) {
  std::vector<std::size_t> off{0};
  for (const MatrixGroup& g : groups)
    off.push_back(off.back() + g.mats.size() * std::size_t(per_matrix(g.rows, g.cols)));
  return off;
}

// The update of the matrices this rank owns (Zero1Plan::own_groups), from their averaged and
// clipped gradients (Zero1Plan::matrix_grad), written into params.
template <typename T>
class MatrixOptimizer {
 public:
  virtual ~MatrixOptimizer() = default;
  // `lr` is the group's learning rate, `t` the 1-based step; nothing is written when the step's
  // `gate` (device, Backend::step_gate) says skip. *acc (device) += the sum of squares of the
  // applied update direction (its RMS is logged as update_rms).
  virtual void step(T* params, double lr, std::int64_t t, const double* gate, double* acc) = 0;
  virtual std::vector<StateTensor<T>> state() = 0;
  // Matrices this rank orthogonalised (or otherwise transformed) during the last step.
  virtual int transformed_last_step() const = 0;
};

}  // namespace moetrain
