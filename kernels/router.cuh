// kernels/router.cuh — MoE router kernels (docs/design.md §3): scores, top-k, gate weights, expert
// counts, load-balancing / z-loss / entropy statistics, and the backward to the router logits.
// Host-side launchers only; the kernels are in router.cu. Same contract as Backend::router_forward
// and Backend::router_backward (include/backend/moetrain/backend_ops.hpp) and the CPU reference
// src/backend/cpu/router.cpp. Logits, scores, gates, bias and statistics are fp32 (the router is
// kept in fp32 on every backend).
//
//   router_forward   scores [tokens, E] (softmax probabilities or sigmoid scores), topk [tokens, k]
//                    (by score, or score + bias for sigmoid_bias; ties to the lower expert index,
//                    selected in descending order), gates [tokens, k] (chosen scores normalised to
//                    sum 1, times route_scale for sigmoid_bias), counts [E] (assignments per
//                    expert), stats [3] = {L_aux = E * sum_e f_e P_e, L_z = mean_t lse_t^2,
//                    mean router entropy}. Every statistic is a deterministic reduction
//                    (per-block partials in double, then one block adds them in block order).
//                    `workspace` holds router_forward_workspace_bytes(tokens, E) bytes.
//   router_backward  dlogits [tokens, E] (overwritten) = the gradient through the gates from dgates
//                    (which already carry the caller's loss scale) + grad_scale * (aux_coef dL_aux
//                    + z_coef dL_z); f_e = counts_e / (tokens k) is held constant.
//
// Limits: 1 <= top_k <= n_experts <= 1024 (checked: std::invalid_argument).
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.cuh"

namespace moetrain::kernels {

struct RouterDims {
  int tokens = 0;
  int n_experts = 0;
  int top_k = 0;
  bool sigmoid = false;      // false: softmax_topk, true: sigmoid_bias
  double route_scale = 1.0;  // sigmoid_bias only
};

inline constexpr int kRouterMaxExperts = 1024;

std::size_t router_forward_workspace_bytes(int tokens, int n_experts);

void router_forward(float* scores, int32_t* topk, float* gates, int32_t* counts, float* stats,
                    const float* logits, const float* bias, const RouterDims& dims, void* workspace,
                    cudaStream_t stream);

void router_backward(float* dlogits, const float* dgates, const float* logits, const float* scores,
                     const int32_t* topk, const float* gates, const int32_t* counts,
                     const RouterDims& dims, double aux_coef, double z_coef, double grad_scale,
                     cudaStream_t stream);

}  // namespace moetrain::kernels
