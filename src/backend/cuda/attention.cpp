// CudaBackend's causal attention, unfused: per head, S = Q K^T / sqrt(hd) as a GEMM batched over
// the sequences, the causal softmax kernel (which records S_max for QK-clip), then O = P V. P is
// the saved activation, as in the CPU backend. A fused (flash) kernel that never materialises P
// replaces this in part 2; this path is the reference it will be checked against.
//
// Query head h reads kv head h / (n_heads / n_kv_heads); the backward visits heads in order and
// accumulates dK, dV of a shared kv head with beta = 1, so the sums are deterministic.
#include <cmath>

#include "attention.cuh"
#include "backend/cuda/cuda_backend.hpp"

namespace moetrain {

std::size_t CudaBackend::attention_saved_elems(const AttentionShape& s) const {
  return s.probs_elems();  // P
}

// q, k, v and the output are activations (f32, or bf16 in bf16 mode); S, P and dP are fp32.
void CudaBackend::attention_forward(DevPtr out, float* saved, float* smax, CDevPtr qkv,
                                    const AttentionShape& s) {
  const int T = s.seq, hd = s.head_dim, W = s.qkv_width(), Wo = s.out_width();
  const int H = s.n_heads, KV = s.n_kv_heads, group = H / KV;
  const std::size_t tt = std::size_t(T) * T, seq_stride = std::size_t(T) * W;
  const float scale = float(1.0 / std::sqrt(double(hd)));
  for (int h = 0; h < H; ++h) {
    const int g = h / group;
    gemm_batched(false, true, T, T, hd, scale, qkv + std::size_t(h) * hd, W, seq_stride,
                 qkv + std::size_t(H + g) * hd, W, seq_stride, 0.0f, saved + std::size_t(h) * tt, T,
                 std::size_t(H) * tt, s.batch);
  }
  void* ws = scratch(op_scratch_, kernels::causal_softmax_workspace_bytes(s.batch, H, T));
  kernels::causal_softmax_forward(saved, smax, saved, s.batch, H, T, ws, stream_);
  for (int h = 0; h < H; ++h) {
    const int g = h / group;
    gemm_batched(false, false, T, hd, T, 1.0f, saved + std::size_t(h) * tt, T, std::size_t(H) * tt,
                 qkv + std::size_t(H + KV + g) * hd, W, seq_stride, 0.0f, out + std::size_t(h) * hd,
                 Wo, std::size_t(T) * Wo, s.batch);
  }
}

void CudaBackend::attention_backward(DevPtr dqkv, CDevPtr dout, CDevPtr qkv, const float* saved,
                                     const AttentionShape& s) {
  const int T = s.seq, hd = s.head_dim, W = s.qkv_width(), Wo = s.out_width();
  const int H = s.n_heads, KV = s.n_kv_heads, group = H / KV;
  const std::size_t tt = std::size_t(T) * T, seq_stride = std::size_t(T) * W;
  const std::size_t out_stride = std::size_t(T) * Wo, head_stride = std::size_t(H) * tt;
  const float scale = float(1.0 / std::sqrt(double(hd)));
  auto* dP =
      static_cast<float*>(scratch(attention_, std::size_t(s.batch) * head_stride * sizeof(float)));
  zero(dqkv.get(), std::size_t(s.rows()) * W * dqkv.element_bytes());
  for (int h = 0; h < H; ++h) {
    const int g = h / group;
    const CDevPtr v = qkv + std::size_t(H + KV + g) * hd;
    gemm_batched(false, true, T, T, hd, 1.0f, dout + std::size_t(h) * hd, Wo, out_stride, v, W,
                 seq_stride, 0.0f, dP + std::size_t(h) * tt, T, head_stride, s.batch);
    gemm_batched(true, false, T, hd, T, 1.0f, saved + std::size_t(h) * tt, T, head_stride,
                 dout + std::size_t(h) * hd, Wo, out_stride, 1.0f,
                 dqkv + std::size_t(H + KV + g) * hd, W, seq_stride, s.batch);
  }
  kernels::causal_softmax_backward(dP, dP, saved, s.batch, H, T, stream_);
  for (int h = 0; h < H; ++h) {
    const int g = h / group;
    gemm_batched(false, false, T, hd, T, scale, dP + std::size_t(h) * tt, T, head_stride,
                 qkv + std::size_t(H + g) * hd, W, seq_stride, 0.0f, dqkv + std::size_t(h) * hd, W,
                 seq_stride, s.batch);
    gemm_batched(true, false, T, hd, T, scale, dP + std::size_t(h) * tt, T, head_stride,
                 qkv + std::size_t(h) * hd, W, seq_stride, 1.0f, dqkv + std::size_t(H + g) * hd, W,
                 seq_stride, s.batch);
  }
}

}  // namespace moetrain
