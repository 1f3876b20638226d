#include "optim/normuon.hpp"

#include <algorithm>
#include <cmath>

#include "optim/muon.hpp"

namespace moetrain {

template <typename T>
NorMuon<T>::NorMuon(const OptimConfig& o, Zero1Plan<T>& plan)
    : o_(o),
      plan_(plan),
      be_(plan.backend()),
      v_offsets_(group_state_offsets(plan.own_groups(), [](int rows, int) { return rows; })),
      momentum_(be_, plan.own_elems()),
      v_(be_, v_offsets_.back()),
      ns_(o, be_, plan.own_groups()) {}

template <typename T>
void NorMuon<T>::step(T* params, double lr, std::int64_t, const double* gate, double* acc) {
  const bool original = o_.normuon_scale == MuonScale::Original;
  // The reference's lerp momentum, M = mu M + (1 - mu) G and U = (1 - mu) G + mu M, is (1 - mu)
  // times Muon's: so is its Newton-Schulz input, whose normalisation therefore adds its epsilon
  // to (1 - mu) times the norm here.
  orthogonalised_ = orthogonalised_step(
      o_, plan_, ns_, momentum_.get(), params, lr, gate, acc, false, 1.0 / (1.0 - o_.momentum),
      [&](std::size_t gi, const MatrixGroup& g, std::size_t first, int count, T* O) {
        const int A = g.rows, B = g.cols;
        // original: ||O_hat||_F = ||O||_F, then sqrt(max(1, A/B)); the paper's: 0.2 sqrt(AB).
        const double target = original ? 0.0 : 0.2 * std::sqrt(double(A) * double(B));
        be_.second_moment_normalize(O, v_.get() + v_offsets_[gi] + first * std::size_t(A), count, A,
                                    B, /*per_row=*/true, o_.normuon_beta2, kEps, target, gate);
        return original ? std::sqrt(std::max(1.0, double(A) / double(B))) : 1.0;
      });
}

template <typename T>
std::vector<StateTensor<T>> NorMuon<T>::state() {
  std::vector<StateTensor<T>> out;
  const std::vector<MatrixGroup>& groups = plan_.own_groups();
  for (std::size_t gi = 0; gi < groups.size(); ++gi)
    for (std::size_t k = 0; k < groups[gi].mats.size(); ++k) {
      const OwnedMatrix& mt = plan_.matrices()[groups[gi].mats[k]];
      const std::size_t rows = std::size_t(mt.rows);
      out.push_back({"normuon.momentum." + mt.name,
                     momentum_.get() + mt.state,
                     mt.elems(),
                     {mt.rows, mt.cols}});
      out.push_back(
          {"normuon.v." + mt.name, v_.get() + v_offsets_[gi] + k * rows, rows, {mt.rows, 1}});
    }
  return out;
}

template class NorMuon<float>;
template class NorMuon<double>;

}  // namespace moetrain
