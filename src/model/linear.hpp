// The linear layer y = x W^T on the backend's GEMM, forward and backward side by side. Weights are
// [out, in] (PyTorch's nn.Linear layout); activations are row-major [N, features], in the
// backend's activation storage; weights and their gradients are T.
#pragma once

#include "moetrain/backend.hpp"

namespace moetrain {

// y[N,out] = x[N,in] W[out,in]^T (+ y when accumulate)
template <typename T>
void linear_forward(Backend<T>& be, DevPtr y, CDevPtr x, const T* W, int N, int in, int out,
                    bool accumulate = false) {
  be.gemm(false, true, N, out, in, T(1), x, in, W, in, T(accumulate ? 1 : 0), y, out);
}

// dx[N,in] (+)= dy[N,out] W[out,in];  dW[out,in] += dy^T x
template <typename T>
void linear_backward(Backend<T>& be, DevPtr dx, T* dW, CDevPtr dy, CDevPtr x, const T* W, int N,
                     int in, int out, bool accumulate_dx) {
  be.gemm(false, false, N, in, out, T(1), dy, out, W, in, T(accumulate_dx ? 1 : 0), dx, in);
  be.gemm(true, false, out, in, N, T(1), dy, out, x, in, T(1), dW, in);
}

}  // namespace moetrain
