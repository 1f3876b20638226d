// The SwiGLU feed-forward block, out += (silu(x W1^T) * (x W3^T)) W2^T, forward and backward side
// by side. Dense layers use it, and so do an MoE layer's shared experts. W1 and W3 are one fused
// [2 ff, d] block (param_layout.hpp), so the first product is one GEMM.
#pragma once

#include "model/arena.hpp"
#include "moetrain/backend.hpp"
#include "moetrain/param_layout.hpp"

namespace moetrain {

// What one SwiGLU block keeps for backward.
template <typename T>
struct FfnActs {
  T* h = nullptr;    // [rows, 2 ff]  x [W1; W3]^T
  T* act = nullptr;  // [rows, ff]    silu(h1) * h3
  void plan(ArenaPlan& plan, std::size_t rows, std::size_t ff) {
    plan.request(h, checked_mul(checked_mul(rows, 2), ff));
    plan.request(act, checked_mul(rows, ff));
  }
};

// Backward scratch shared by every SwiGLU block of the model (sized by the largest).
template <typename T>
struct FfnScratch {
  T* dh = nullptr;    // [rows, 2 ff]
  T* dact = nullptr;  // [rows, ff]
};

// out[rows, d] += FFN(x[rows, d])
template <typename T>
void ffn_forward(Backend<T>& be, const T* params, const SwiGluOffsets& w, int d, const T* x,
                 int rows, const FfnActs<T>& a, T* out);

// dx[rows, d] (+)= d/dx of FFN (accumulate_dx) from dout; weight gradients += into grads.
template <typename T>
void ffn_backward(Backend<T>& be, const T* params, T* grads, const SwiGluOffsets& w, int d,
                  const T* x, int rows, const FfnActs<T>& a, const T* dout, T* dx,
                  bool accumulate_dx, const FfnScratch<T>& scratch);

}  // namespace moetrain
