// kernels/moe_permute.cuh — MoE token permutation (docs/design.md §3): group the tokens * k (token,
// slot) assignments by expert so each expert runs one contiguous GEMM, and the gate-weighted
// combine back. Host-side launchers only; kernels in moe_permute.cu. Same contracts as
// Backend::moe_permute* and the CPU reference src/backend/cpu/moe_permute.cpp. T is the activation
// type (float or
// __nv_bfloat16); gates and dgates are fp32; every sum is accumulated in fp32 in slot order.
//
//   moe_permute             offsets [E + 1] = exclusive scan of counts; pos [tokens * k]: row of
//                           assignment a = t * k + j in the grouped buffer, stable in token order
//                           (equal to the CPU's pos exactly); xg [tokens * k, d]: xg[pos[a]] = x[a
//                           / k]. `workspace` holds moe_permute_workspace_bytes(tokens, E, k)
//                           bytes.
//   moe_permute_backward    dx[t] += sum_j dxg[pos[t * k + j]]   (in slot order)
//   moe_unpermute           y[t] = sum_j gates[t, j] * yg[pos[t * k + j]]
//   moe_unpermute_backward  dyg[pos[t * k + j]] = gates[t, j] * dy[t];  dgates[t, j] = dy[t] .
//   yg[pos[t * k + j]]
//
// Limits: 1 <= n_experts <= 1024, k >= 1, d >= 1 (checked: std::invalid_argument). Rows are copied
// with 16-byte vectors when d * sizeof(T) is a multiple of 16 and the buffers are 16-byte aligned,
// element by element otherwise.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.cuh"

namespace moetrain::kernels {

inline constexpr int kPermuteMaxExperts = 1024;

std::size_t moe_permute_workspace_bytes(int tokens, int n_experts, int k);

template <typename T>
void moe_permute(T* xg, int32_t* pos, int32_t* offsets, const T* x, const int32_t* topk,
                 const int32_t* counts, int tokens, int d, int n_experts, int k, void* workspace,
                 cudaStream_t stream);

template <typename T>
void moe_permute_backward(T* dx, const T* dxg, const int32_t* pos, int tokens, int d, int k,
                          cudaStream_t stream);

template <typename T>
void moe_unpermute(T* y, const T* yg, const float* gates, const int32_t* pos, int tokens, int d,
                   int k, cudaStream_t stream);

template <typename T>
void moe_unpermute_backward(T* dyg, float* dgates, const T* dy, const T* yg, const float* gates,
                            const int32_t* pos, int tokens, int d, int k, cudaStream_t stream);

}  // namespace moetrain::kernels
