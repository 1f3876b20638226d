// kernels/cross_entropy.cuh — fused softmax cross-entropy with the logits' gradient written in
// place (cross_entropy.cu).
//
// Host-side launcher in namespace moetrain::kernels, all pointers device pointers; T (the logits)
// is float or __nv_bfloat16; the softmax statistics and the losses are fp32. `max_blocks` caps the
// grid (0: the default); the kernel loops over the rows the grid does not cover.
//
//   cross_entropy  for each of the n rows of `logits` [n, vocab]:
//                    losses[i] = logsumexp(logits_i) - logits_i[targets[i]]
//                  and, when grad_scale (a device scalar) is not null, overwrites the row with
//                    dlogits_i = *grad_scale * (softmax(logits_i) - onehot(targets[i])).
//                  A negative target is padding: loss 0 and (with grad_scale) a zero row. A
//                  target >= vocab is an error: its loss and gradient row are NaN.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.cuh"

namespace moetrain::kernels {

template <typename T>
void cross_entropy(float* losses, T* logits, const int32_t* targets, int n, int vocab,
                   const float* grad_scale, cudaStream_t stream = nullptr, int max_blocks = 0);

}  // namespace moetrain::kernels
