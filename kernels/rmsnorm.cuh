// kernels/rmsnorm.cuh — RMSNorm fused with the residual add, forward and backward (rmsnorm.cu).
//
// Host-side launchers in namespace moetrain::kernels, all pointers device pointers; T is the
// storage type of activations, gains and gradients: float or __nv_bfloat16. Statistics and all sums
// are fp32; rstd is saved in fp32. `max_blocks` caps the grid (0: the default); the kernels loop
// over the rows the grid does not cover.
//
//   rmsnorm_forward    With `branch` != nullptr: x = x_in + branch is written to x_out (the
//   residual
//                      stream; x_out may equal x_in for an in-place update) and normalised; with
//                      branch == nullptr, x = x_in and x_out is not touched (may be nullptr).
//                      y = x * rstd * gain, rstd[i] = 1 / sqrt(mean(x_i^2) + eps). In bf16 the
//                      statistics use the rounded x that is stored.
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

template <typename T>
void rmsnorm_forward(T* y, float* rstd, T* x_out, const T* x_in, const T* branch, const T* gain,
                     int n, int d, float eps, cudaStream_t stream = nullptr, int max_blocks = 0);

std::size_t rmsnorm_backward_workspace_bytes(int n, int d, int max_blocks = 0);

template <typename T>
void rmsnorm_backward(T* dx, T* dgain, const T* dy, const T* x, const T* gain, const float* rstd,
                      int n, int d, void* workspace, cudaStream_t stream = nullptr,
                      int max_blocks = 0);

}  // namespace moetrain::kernels
