// kernels/embedding.cuh — token embedding lookup and its deterministic backward (embedding.cu).
//
// Host-side launchers in namespace moetrain::kernels, all pointers device pointers; T is the
// storage type of the activations and their gradients, TW that of the table and its gradient:
// (float, float), (bf16, bf16) or (bf16, float) — bf16 activations with the fp32 master table and
// its fp32 gradient (sums in fp32). `max_blocks` caps the grid (0: the default); the kernels loop
// over whatever the grid does not cover, and tests lower the cap to exercise those loops.
//
//   embedding_forward   out[i, :] = table[tokens[i], :] for i < n (rows of d elements); a negative
//                       token gives a zero row. Tokens must be below the table's row count.
//   embedding_backward  dtable[tokens[i], :] += dout[i, :] for i < n (negative tokens skipped).
//                       Deterministic without float atomics: the (token, position) pairs are sorted
//                       (bitonic sort of unique 64-bit keys in `workspace`), then one warp per
//                       distinct token sums that token's dout rows in position order, in fp32, on
//                       top of the row's old value, and writes the row once. In fp32 this is
//                       bit-for-bit the CPU backend's order (old + dout[i1] + dout[i2] + ..., i1 <
//                       i2 < ...). `workspace` must hold embedding_backward_workspace_bytes(n)
//                       bytes.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.cuh"

namespace moetrain::kernels {

template <typename T, typename TW>
void embedding_forward(T* out, const int32_t* tokens, const TW* table, int n, int d,
                       cudaStream_t stream = nullptr, int max_blocks = 0);

std::size_t embedding_backward_workspace_bytes(int n);

template <typename T, typename TW>
void embedding_backward(TW* dtable, const T* dout, const int32_t* tokens, int n, int d,
                        void* workspace, cudaStream_t stream = nullptr, int max_blocks = 0);

}  // namespace moetrain::kernels
