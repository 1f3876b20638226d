#include "optim/adamuon.hpp"

#include <algorithm>
#include <cmath>

#include "optim/muon.hpp"

namespace moetrain {

template <typename T>
AdaMuon<T>::AdaMuon(const OptimConfig& o, Zero1Plan<T>& plan)
    : o_(o),
      plan_(plan),
      be_(plan.backend()),
      v_offsets_(group_state_offsets(plan.own_groups(),
                                     [](int rows, int cols) { return std::size_t(rows) * cols; })),
      momentum_(be_, plan.own_elems()),
      v_(be_, v_offsets_.back()),
      ns_(o, be_, plan.own_groups()) {}

template <typename T>
void AdaMuon<T>::step(T* params, double lr, std::int64_t, const double* gate, double* acc) {
  orthogonalised_ = 0;
  const std::vector<MatrixGroup>& groups = plan_.own_groups();
  for (std::size_t gi = 0; gi < groups.size(); ++gi) {
    const MatrixGroup& g = groups[gi];
    const int A = g.rows, B = g.cols;
    const std::size_t elems = std::size_t(A) * B;
    const double target = 0.2 * std::sqrt(double(A) * double(B));  // RMS 0.2
    for (std::size_t first = 0; first < g.mats.size(); first += kMaxNewtonSchulzBatch) {
      const int count = int(std::min<std::size_t>(kMaxNewtonSchulzBatch, g.mats.size() - first));
      momentum_directions(o_, plan_, momentum_.get(), g, first, count, ns_.input(), gate);
      be_.sign_inplace(ns_.input(), std::size_t(count) * elems);
      T* O = ns_.run(A, B, count);
      be_.second_moment_normalize(O, v_.get() + v_offsets_[gi] + first * elems, count, A, B,
                                  /*per_row=*/false, o_.momentum, o_.eps, target, gate);
      for (int i = 0; i < count; ++i)
        be_.muon_update(params + plan_.matrices()[g.mats[first + std::size_t(i)]].offset,
                        O + std::size_t(i) * elems, elems, lr, 1.0, o_.muon_group.weight_decay,
                        gate, acc);
      orthogonalised_ += count;
    }
  }
}

template <typename T>
std::vector<StateTensor<T>> AdaMuon<T>::state() {
  std::vector<StateTensor<T>> out;
  const std::vector<MatrixGroup>& groups = plan_.own_groups();
  for (std::size_t gi = 0; gi < groups.size(); ++gi)
    for (std::size_t k = 0; k < groups[gi].mats.size(); ++k) {
      const OwnedMatrix& mt = plan_.matrices()[groups[gi].mats[k]];
      out.push_back({"adamuon.momentum." + mt.name,
                     momentum_.get() + mt.slot,
                     mt.elems(),
                     {mt.rows, mt.cols}});
      out.push_back({"adamuon.v." + mt.name,
                     v_.get() + v_offsets_[gi] + k * mt.elems(),
                     mt.elems(),
                     {mt.rows, mt.cols}});
    }
  return out;
}

template class AdaMuon<float>;
template class AdaMuon<double>;

}  // namespace moetrain
