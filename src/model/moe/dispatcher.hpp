// The token dispatcher of an MoE layer (docs/design.md §3): groups the N*k (token, expert)
// assignments by expert so each expert's rows are contiguous (dropless: every assignment is kept),
// and combines the experts' outputs back per token with the gate weights; forward and backward
// side by side.
#pragma once

#include <cstdint>

#include "model/arena.hpp"
#include "moetrain/backend.hpp"

namespace moetrain {

template <typename T>
class Dispatcher {
 public:
  struct Acts {
    std::int32_t* pos = nullptr;      // [N*k]  row of assignment (t, j) in the grouped buffers
    std::int32_t* offsets = nullptr;  // [E+1]  first grouped row of each expert
    DevPtr xg;                        // [N*k, d]  x[t] at the rows of its assignments
  };

  // The arena requests of the grouped buffers of `rows` = N * k rows (the model's plan and the
  // memory estimate).
  static void plan_acts(ArenaPlan& plan, Acts& acts, std::size_t rows, std::size_t n_experts,
                        std::size_t d, Storage s);

  Dispatcher(Backend<T>& be, int tokens, int d, int n_experts, int top_k)
      : be_(be), tokens_(tokens), d_(d), experts_(n_experts), k_(top_k) {}
  void plan(ArenaPlan& plan);
  const Acts& acts() const { return acts_; }
  int rows() const { return tokens_ * k_; }  // grouped rows

  // xg, pos, offsets from x[N, d] and the router's choices topk[N, k], counts[E].
  void dispatch(CDevPtr x, const std::int32_t* topk, const std::int32_t* counts);
  // out[N, d] += sum_j gates[t, j] * yg[pos[t k + j]]   (tmp: [N, d] scratch)
  void combine(DevPtr out, CDevPtr yg, const T* gates, DevPtr tmp);
  // dyg[N*k, d], dgates[N, k] from dout[N, d]
  void combine_backward(DevPtr dyg, T* dgates, CDevPtr dout, CDevPtr yg, const T* gates);
  // dx[N, d] += sum_j dxg[pos[t k + j]]
  void dispatch_backward(DevPtr dx, CDevPtr dxg);

 private:
  Backend<T>& be_;
  int tokens_, d_, experts_, k_;
  Acts acts_;
};

extern template class Dispatcher<float>;
extern template class Dispatcher<double>;

}  // namespace moetrain
