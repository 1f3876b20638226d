// kernels/flash_attention.cuh — causal flash attention on the tensor cores (flash_attention.cu):
// the scores never reach DRAM, and S_max, the per-head maximum logit QK-clip needs, comes out of
// the running row maxima the online softmax keeps anyway. CPU reference:
// src/backend/cpu/attention.cpp (Backend::attention_forward).
//
// Layouts (all device pointers): qkv is the fused [batch * seq, (H + 2 Hkv) * hd] bf16 buffer of
// the model (query heads, then key heads, then value heads; query head h reads kv head
// h / (H / Hkv), without copying k or v); out is [batch * seq, H * hd] bf16; lse is
// [batch, H, seq] fp32: the natural-log logsumexp of each row's scaled scores, what the backward
// recomputes P from.
//
//   flash_attention_forward   out = softmax(q k^T / sqrt(hd), causal) v per (batch, head);
//                             smax[h] = max over the batch, i and j <= i of q_i . k_j / sqrt(hd)
//                             (fp32 dot products of the bf16 inputs), reduced over query blocks
//                             and the batch by a second kernel (a max is exact, so the value does
//                             not depend on the order). head_dim 16, 32, 64 or 128. `workspace`
//                             holds flash_attention_workspace_bytes(s).
//   flash_attention_backward  FA2's backward from the saved logsumexp: Delta = rowsum(dO o O);
//                             dK, dV per key block (k, v in registers, walking the query blocks
//                             and the group's query heads in a fixed order), then dQ per query
//                             block (walking the key blocks); no float atomics, so gradients are
//                             bit-identical run to run. A kv head's dK, dV sum its query heads.
#pragma once

#include <cstddef>

#include "common.cuh"

namespace moetrain::kernels {

struct FlashShape {
  int batch, seq, n_heads, n_kv_heads, head_dim;
};

std::size_t flash_attention_workspace_bytes(const FlashShape& s);

void flash_attention_forward(__nv_bfloat16* out, float* lse, float* smax, const __nv_bfloat16* qkv,
                             const FlashShape& s, void* workspace, cudaStream_t stream);

// dqkv (the fused layout of qkv; every q, k and v element of the batch's rows is written) from
// dout ([batch * seq, H * hd] bf16) and the forward's qkv, out and lse. `workspace` holds
// flash_attention_backward_workspace_bytes(s).
std::size_t flash_attention_backward_workspace_bytes(const FlashShape& s);
void flash_attention_backward(__nv_bfloat16* dqkv, const __nv_bfloat16* dout,
                              const __nv_bfloat16* qkv, const __nv_bfloat16* out, const float* lse,
                              const FlashShape& s, void* workspace, cudaStream_t stream);

}  // namespace moetrain::kernels
