// The SwiGLU feed-forward block, out += (silu(x W1^T) * (x W3^T)) W2^T, forward and backward side
// by side. Dense layers use it, and so do an MoE layer's shared experts. W1 and W3 are one fused
// [2 ff, d] block (param_layout.hpp), so the first product is one GEMM.
#pragma once

#include "model/arena.hpp"
#include "moetrain/backend.hpp"
#include "moetrain/param_layout.hpp"

namespace moetrain {

// What one SwiGLU block keeps for backward (activations, storage `s`).
struct FfnActs {
  DevPtr h;    // [rows, 2 ff]  x [W1; W3]^T
  DevPtr act;  // [rows, ff]    silu(h1) * h3
  void plan(ArenaPlan& plan, std::size_t rows, std::size_t ff, Storage s) {
    plan.request(h, checked_mul(checked_mul(rows, 2), ff), s);
    plan.request(act, checked_mul(rows, ff), s);
  }
};

// Backward scratch shared by every SwiGLU block of the model (sized by the largest).
struct FfnScratch {
  DevPtr dh;    // [rows, 2 ff]
  DevPtr dact;  // [rows, ff]
};

// out[rows, d] += FFN(x[rows, d])
template <typename T>
void ffn_forward(Backend<T>& be, const T* params, const SwiGluOffsets& w, int d, CDevPtr x,
                 int rows, const FfnActs& a, DevPtr out);

// dx[rows, d] (+)= d/dx of FFN (accumulate_dx) from dout; weight gradients += into grads.
template <typename T>
void ffn_backward(Backend<T>& be, const T* params, T* grads, const SwiGluOffsets& w, int d,
                  CDevPtr x, int rows, const FfnActs& a, CDevPtr dout, DevPtr dx,
                  bool accumulate_dx, const FfnScratch& scratch);

}  // namespace moetrain
