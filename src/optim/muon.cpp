#include "optim/muon.hpp"

#include <algorithm>
#include <cmath>

namespace moetrain {

template <typename T>
void momentum_directions(const OptimConfig& o, Zero1Plan<T>& plan, T* momentum,
                         const MatrixGroup& g, std::size_t first, int count, T* out,
                         const double* gate) {
  const std::size_t elems = std::size_t(g.rows) * std::size_t(g.cols);
  for (int i = 0; i < count; ++i) {
    const OwnedMatrix& mt = plan.matrices()[g.mats[first + std::size_t(i)]];
    plan.backend().muon_momentum(momentum + mt.slot, out + std::size_t(i) * elems,
                                 plan.matrix_grad(mt), elems, o.momentum, o.nesterov, gate);
  }
}

template <typename T>
Muon<T>::Muon(const OptimConfig& o, Zero1Plan<T>& plan)
    : o_(o),
      plan_(plan),
      be_(plan.backend()),
      momentum_(be_, plan.own_elems()),
      ns_(o, be_, plan.own_groups()) {}

template <typename T>
void Muon<T>::step(T* params, double lr, std::int64_t, const double* gate, double* acc) {
  orthogonalised_ = 0;
  for (const MatrixGroup& g : plan_.own_groups()) {
    const int A = g.rows, B = g.cols;
    const std::size_t elems = std::size_t(A) * B;
    const double scale = o_.muon_scale == MuonScale::Original
                             ? std::sqrt(std::max(1.0, double(A) / double(B)))
                             : 0.2 * std::sqrt(double(std::max(A, B)));
    for (std::size_t first = 0; first < g.mats.size(); first += kMaxNewtonSchulzBatch) {
      const int count = int(std::min<std::size_t>(kMaxNewtonSchulzBatch, g.mats.size() - first));
      momentum_directions(o_, plan_, momentum_.get(), g, first, count, ns_.input(), gate);
      const T* O = ns_.run(A, B, count);
      for (int i = 0; i < count; ++i)
        be_.muon_update(params + plan_.matrices()[g.mats[first + std::size_t(i)]].offset,
                        O + std::size_t(i) * elems, elems, lr, scale, o_.muon_group.weight_decay,
                        gate, acc);
      orthogonalised_ += count;
    }
  }
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

template void momentum_directions<float>(const OptimConfig&, Zero1Plan<float>&, float*,
                                         const MatrixGroup&, std::size_t, int, float*,
                                         const double*);
template void momentum_directions<double>(const OptimConfig&, Zero1Plan<double>&, double*,
                                          const MatrixGroup&, std::size_t, int, double*,
                                          const double*);
template class Muon<float>;
template class Muon<double>;

}  // namespace moetrain
