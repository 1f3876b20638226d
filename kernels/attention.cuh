// kernels/attention.cuh — the causal softmax of unfused attention (attention.cu); the two GEMMs
// around it (S = Q K^T / sqrt(hd), O = P V and their backward) are cuBLASLt calls of the backend.
// CPU reference: src/backend/cpu/attention.cpp.
//
// Host-side launchers in namespace moetrain::kernels, all pointers device pointers, all fp32.
// S, P, dP, dS are [batch, heads, seq, seq] row-major; row i of head (b, h) holds the logits of
// query i against keys j. Entries j > i (above the diagonal) of S and dP are never read: they may
// hold anything (NaN in S). Empty shapes launch nothing.
//
//   causal_softmax_forward   P[j] = exp(S[j] - m) / sum_{k<=i} exp(S[k] - m) for j <= i with
//                            m = max_{k<=i} S[k], and P[j] = 0 for j > i. P may alias S.
//                            smax[h] (`heads` floats) = max over b, i and j <= i of S: the largest
//                            pre-softmax logit of head h, for QK-clip. Deterministic (no atomics).
//                            `workspace` holds causal_softmax_workspace_bytes(batch, heads, seq).
//   causal_softmax_backward  dS[j] = P[j] (dP[j] - sum_{k<=i} P[k] dP[k]) for j <= i, 0 for j > i.
//                            dS may alias dP.
#pragma once

#include <cstddef>

#include "common.cuh"

namespace moetrain::kernels {

std::size_t causal_softmax_workspace_bytes(int batch, int heads, int seq);

void causal_softmax_forward(float* P, float* smax, const float* S, int batch, int heads, int seq,
                            void* workspace, cudaStream_t stream);

void causal_softmax_backward(float* dS, const float* dP, const float* P, int batch, int heads,
                             int seq, cudaStream_t stream);

}  // namespace moetrain::kernels
