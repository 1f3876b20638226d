// CudaBackend's causal attention: the flash kernels of kernels/flash_attention.cu (forward and
// FA2 backward on mma.sync, S_max from the running row maxima). `saved` is each row's logsumexp
// [batch, n_heads, seq], so attention keeps O(B·H·T) floats for backward instead of the T×T
// probabilities. The kernels read and write bf16: in bf16 mode the activations are already bf16;
// in fp32 mode q, k, v and the gradients are rounded to bf16 on their way in and widened on their
// way out (attention is then bf16-exact, not fp32-exact: docs/design.md §6.1).
#include "backend/cuda/cuda_backend.hpp"
#include "elementwise.cuh"
#include "flash_attention.cuh"

namespace moetrain {

namespace {
kernels::FlashShape flash_shape(const AttentionShape& s) {
  return {s.batch, s.seq, s.n_heads, s.n_kv_heads, s.head_dim};
}
}  // namespace

std::size_t CudaBackend::attention_saved_elems(const AttentionShape& s) const {
  return std::size_t(s.batch) * std::size_t(s.n_heads) * std::size_t(s.seq);  // the logsumexp
}

const __nv_bfloat16* CudaBackend::attention_input(CDevPtr x, std::size_t elems, Scratch& buf) {
  if (x.storage() == Storage::BF16) return device_ptr<__nv_bfloat16>(x);
  auto* out = static_cast<__nv_bfloat16*>(scratch(buf, elems * sizeof(__nv_bfloat16)));
  kernels::convert_to_bf16(out, int(elems), x.as<const float>(), int(elems), 1, int(elems),
                           stream_);
  return out;
}

void CudaBackend::attention_forward(DevPtr out, float* saved, float* smax, CDevPtr qkv,
                                    const AttentionShape& s) {
  with_activation_type("attention_forward", {out, qkv}, [](auto) {});
  const kernels::FlashShape fs = flash_shape(s);
  const std::size_t rows = std::size_t(s.rows());
  const __nv_bfloat16* q = attention_input(qkv, rows * std::size_t(s.qkv_width()), attention_qkv_);
  void* ws = scratch(op_scratch_, kernels::flash_attention_workspace_bytes(fs));
  const std::size_t out_elems = rows * std::size_t(s.out_width());
  if (out.storage() == Storage::BF16) {
    kernels::flash_attention_forward(device_ptr<__nv_bfloat16>(out), saved, smax, q, fs, ws,
                                     stream_);
    return;
  }
  auto* o = static_cast<__nv_bfloat16*>(scratch(attention_out_, out_elems * sizeof(__nv_bfloat16)));
  kernels::flash_attention_forward(o, saved, smax, q, fs, ws, stream_);
  kernels::convert_from_bf16(out.as<float>(), o, out_elems, stream_);
}

void CudaBackend::attention_backward(DevPtr dqkv, CDevPtr dout, CDevPtr qkv, CDevPtr out,
                                     const float* saved, const AttentionShape& s) {
  with_activation_type("attention_backward", {dqkv, dout, qkv, out}, [](auto) {});
  const kernels::FlashShape fs = flash_shape(s);
  const std::size_t rows = std::size_t(s.rows());
  const std::size_t qkv_elems = rows * std::size_t(s.qkv_width()),
                    out_elems = rows * std::size_t(s.out_width());
  const __nv_bfloat16* q = attention_input(qkv, qkv_elems, attention_qkv_);
  const __nv_bfloat16* o = attention_input(out, out_elems, attention_out_);
  const __nv_bfloat16* d = attention_input(dout, out_elems, attention_dout_);
  void* ws = scratch(op_scratch_, kernels::flash_attention_backward_workspace_bytes(fs));
  if (dqkv.storage() == Storage::BF16) {
    kernels::flash_attention_backward(device_ptr<__nv_bfloat16>(dqkv), d, q, o, saved, fs, ws,
                                      stream_);
    return;
  }
  auto* g =
      static_cast<__nv_bfloat16*>(scratch(attention_dqkv_, qkv_elems * sizeof(__nv_bfloat16)));
  kernels::flash_attention_backward(g, d, q, o, saved, fs, ws, stream_);
  kernels::convert_from_bf16(dqkv.as<float>(), g, qkv_elems, stream_);
}

}  // namespace moetrain
