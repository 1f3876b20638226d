// kernels/rmsnorm.cuh — RMSNorm, forward and backward (rmsnorm.cu).
//
// Host-side launchers in namespace moetrain::kernels, all pointers device pointers; T is the
// storage type of the activations and their gradients, TG that of the gain and its gradient:
// (float, float), (bf16, bf16), or (bf16, float) — bf16 activations with the fp32 master gain and
// its fp32 gradient. Statistics and all sums are fp32; rstd is saved in fp32. `max_blocks` caps the
// grid (0: the default); the kernels loop over the rows the grid does not cover.
//
//   rmsnorm_forward    y = x * rstd * gain, rstd[i] = 1 / sqrt(mean(x_i^2) + eps).
//   rmsnorm_backward   With xhat = x * rstd and gh = dy * gain:
//                        dx    += rstd * (gh - xhat * mean(gh * xhat))   (dx: the residual
//                        gradient) dgain += sum over rows of dy * xhat
//                      dgain is deterministic without atomics: each block writes fp32 partial sums
//                      of its rows (warps in fixed order) to `workspace`, and a second kernel adds
//                      the partials in block order. `workspace` must hold
//                      rmsnorm_backward_workspace_bytes(n, d, max_blocks) bytes. dx may not alias
//                      dy.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.cuh"

namespace moetrain::kernels {

template <typename T, typename TG>
void rmsnorm_forward(T* y, float* rstd, const T* x, const TG* gain, int n, int d, float eps,
                     cudaStream_t stream = nullptr, int max_blocks = 0);

std::size_t rmsnorm_backward_workspace_bytes(int n, int d, int max_blocks = 0);

template <typename T, typename TG>
void rmsnorm_backward(T* dx, TG* dgain, const T* dy, const T* x, const TG* gain, const float* rstd,
                      int n, int d, void* workspace, cudaStream_t stream = nullptr,
                      int max_blocks = 0);

}  // namespace moetrain::kernels
