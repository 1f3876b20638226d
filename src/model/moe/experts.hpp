// The routed experts of an MoE layer (docs/design.md §3): E SwiGLU FFNs applied to the rows the
// dispatcher grouped by expert, each GEMM of all experts one grouped_gemm call over the expert
// offsets (so a GPU kernel can run them as one launch that reads the offsets on the device);
// forward and backward side by side.
#pragma once

#include <cstdint>
#include <vector>

#include "model/arena.hpp"
#include "model/ffn.hpp"
#include "moetrain/backend.hpp"
#include "moetrain/param_layout.hpp"

namespace moetrain {

template <typename T>
class Experts {
 public:
  struct Acts {
    DevPtr h;    // [N*k, 2 ff]  xg [W1_e; W3_e]^T on expert e's rows
    DevPtr act;  // [N*k, ff]    silu(h1) * h3
    DevPtr y;    // [N*k, d]     act W2_e^T
  };
  // The arena requests of `rows` = N * k grouped rows through experts of width ff (the model's
  // plan and the memory estimate).
  static void plan_acts(ArenaPlan& plan, Acts& acts, std::size_t rows, std::size_t ff,
                        std::size_t d, Storage s);

  // `experts`: the layer's expert offsets, evenly strided in the parameter buffer.
  Experts(Backend<T>& be, const std::vector<SwiGluOffsets>& experts, int rows, int d);
  void plan(ArenaPlan& plan);
  const Acts& acts() const { return acts_; }

  // y from xg[N*k, d] grouped by offsets[E+1] (device).
  void forward(const T* params, CDevPtr xg, const std::int32_t* offsets);
  // dxg[N*k, d] (overwritten) from dy[N*k, d]; weight gradients += into grads. The scratch is
  // shared with the other SwiGLU blocks ([N*k, 2 ff] and [N*k, ff] at least).
  void backward(const T* params, T* grads, CDevPtr xg, const std::int32_t* offsets, CDevPtr dy,
                DevPtr dxg, const FfnScratch& s);

 private:
  Backend<T>& be_;
  int experts_, ff_, rows_, d_;
  std::size_t w13_, w2_, stride_;  // expert 0's W1|W3 and W2, and the step to the next expert
  Acts acts_;
};

extern template class Experts<float>;
extern template class Experts<double>;

}  // namespace moetrain
