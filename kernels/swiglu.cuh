// kernels/swiglu.cuh — SwiGLU activation on the fused expert hidden h = [w1 x | w3 x] (swiglu.cu).
//
// Host-side launchers in namespace moetrain::kernels, all pointers device pointers; T is float or
// __nv_bfloat16 (math in fp32). `max_blocks` caps the grid's row dimension (0: the default); the
// kernels loop over the rows the grid does not cover.
//
//   swiglu_forward   h is [rows, 2 ff] (h1 = h[:, :ff], h3 = h[:, ff:]); out [rows, ff]:
//                    out = silu(h1) * h3, silu(a) = a / (1 + exp(-a)).
//   swiglu_backward  dh [rows, 2 ff] from dout [rows, ff]:
//                    dh1 = dout * h3 * sig(h1) * (1 + h1 * (1 - sig(h1))),  dh3 = dout * silu(h1).
//                    dh may alias h (each element is read before it is written, by the same
//                    thread).
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.cuh"

namespace moetrain::kernels {

template <typename T>
void swiglu_forward(T* out, const T* h, int rows, int ff, cudaStream_t stream = nullptr,
                    int max_blocks = 0);

template <typename T>
void swiglu_backward(T* dh, const T* dout, const T* h, int rows, int ff,
                     cudaStream_t stream = nullptr, int max_blocks = 0);

}  // namespace moetrain::kernels
