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
  orthogonalised_ = orthogonalised_step(
      o_, plan_, ns_, momentum_.get(), params, lr, gate, acc, /*sign_input=*/true, 1.0,
      [&](std::size_t gi, const MatrixGroup& g, std::size_t first, int count, T* O) {
        const std::size_t elems = std::size_t(g.rows) * std::size_t(g.cols);
        const double target = 0.2 * std::sqrt(double(elems));  // RMS 0.2
        be_.second_moment_normalize(O, v_.get() + v_offsets_[gi] + first * elems, count, g.rows,
                                    g.cols, /*per_row=*/false, o_.momentum, o_.eps, target, gate);
        return 1.0;
      });
}

template <typename T>
std::vector<StateTensor<T>> AdaMuon<T>::state() {
  std::vector<StateTensor<T>> out;
  const std::vector<MatrixGroup>& groups = plan_.own_groups();
  for (std::size_t gi = 0; gi < groups.size(); ++gi)
    for (std::size_t k = 0; k < groups[gi].mats.size(); ++k) {
      const OwnedMatrix& mt = plan_.matrices()[groups[gi].mats[k]];
      out.push_back({"adamuon.momentum." + mt.name,
                     momentum_.get() + mt.state,
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
