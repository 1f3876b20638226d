// kernels/rope.cuh — rotary position embedding, half-split ("rotate_half") convention (rope.cu).
//
// Host-side launchers in namespace moetrain::kernels, all pointers device pointers. T is the
// storage type of x (float or __nv_bfloat16); TC the type of the cos/sin tables (float, or T
// itself); the rotation is computed in fp32. Instantiated for (float, float), (bf16, bf16) and
// (bf16, float). `max_blocks` caps the grid (0: the default); the kernels loop over the rows the
// grid does not cover.
//
//   rope_forward   in place on the first n_heads heads of each of `rows` rows (row r starts at
//                  x + r * ld, head h at + h * head_dim; head_dim even). Row r is at position
//                  r % seq; cos/sin are [seq, head_dim / 2]. For i < head_dim / 2, with a = v[i],
//                  b = v[i + hd/2]:  v[i] = a cos - b sin,  v[i + hd/2] = b cos + a sin.
//   rope_backward  the inverse rotation (sin -> -sin), the transpose of the forward, in place on
//   dx.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.cuh"

namespace moetrain::kernels {

template <typename T, typename TC>
void rope_forward(T* x, int ld, int rows, int seq, int n_heads, int head_dim, const TC* cos,
                  const TC* sin, cudaStream_t stream = nullptr, int max_blocks = 0);

template <typename T, typename TC>
void rope_backward(T* dx, int ld, int rows, int seq, int n_heads, int head_dim, const TC* cos,
                   const TC* sin, cudaStream_t stream = nullptr, int max_blocks = 0);

}  // namespace moetrain::kernels
