#include "optim/muon.hpp"

#include <algorithm>
#include <cmath>

namespace moetrain {

template <typename T>
Muon<T>::Muon(const OptimConfig& o, Zero1Plan<T>& plan)
    : o_(o),
      plan_(plan),
      be_(plan.backend()),
      momentum_(be_, plan.own_elems()),
      ns_(o, be_, plan.own_groups()) {}

template <typename T>
void Muon<T>::step(T* params, double lr, std::int64_t, const double* gate, double* acc) {
  const MuonScale mode = o_.muon_scale;
  orthogonalised_ =
      orthogonalised_step(o_, plan_, ns_, momentum_.get(), params, lr, gate, acc, false, 1.0,
                          [mode](std::size_t, const MatrixGroup& g, std::size_t, int, T*) {
                            return mode == MuonScale::Original
                                       ? std::sqrt(std::max(1.0, double(g.rows) / double(g.cols)))
                                       : 0.2 * std::sqrt(double(std::max(g.rows, g.cols)));
                          });
}

template <typename T>
std::vector<StateTensor<T>> Muon<T>::state() {
  std::vector<StateTensor<T>> out;
  for (const MatrixGroup& g : plan_.own_groups())
    for (std::size_t i : g.mats) {
      const OwnedMatrix& mt = plan_.matrices()[i];
      out.push_back(
          {"muon.momentum." + mt.name, momentum_.get() + mt.state, mt.elems(), {mt.rows, mt.cols}});
    }
  return out;
}

template class Muon<float>;
template class Muon<double>;

}  // namespace moetrain
