// Model FLOPs per token, counted from the config (not from what a backend happens to execute):
// 2 FLOPs per multiply-add of every matmul a token passes through (its k routed experts only),
// plus the causal attention core (QK^T and PV over the (T+1)/2 keys a query sees on average).
// Training costs 3x the forward (the backward computes two matmuls per forward matmul).
// Embedding lookups, norms, activations and softmaxes are not counted.
#pragma once

#include "moetrain/backend.hpp"
#include "moetrain/config.hpp"

namespace moetrain {

struct FlopCount {
  double attn_proj = 0;  // q, k, v, o projections
  double attn_core = 0;  // QK^T and PV, causal
  double ffn = 0;        // dense SwiGLU, routed experts (k of them), shared experts
  double router = 0;
  double lm_head = 0;
  double forward() const { return attn_proj + attn_core + ffn + router + lm_head; }
  double training() const { return 3 * forward(); }
};

FlopCount flops_per_token(const ModelConfig& cfg);

// The machine's GEMM peak, measured: best of 3 timed n x n x n GEMMs through `backend` (after one
// untimed warm-up), in GFLOP/s. The denominator of MFU.
double measure_gemm_peak_gflops(Backend<float>& backend, int n = 2048);

}  // namespace moetrain
