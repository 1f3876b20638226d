// CudaBackend: memory, the stream, and every op that is one kernel launch (GEMMs in gemm.cpp,
// attention in attention.cpp). Kernels take their workspaces from grow-only scratch buffers.
#include "backend/cuda/cuda_backend.hpp"

#include <algorithm>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#include "cross_entropy.cuh"
#include "elementwise.cuh"
#include "embedding.cuh"
#include "moe_permute.cuh"
#include "optimizer.cuh"
#include "rmsnorm.cuh"
#include "rope.cuh"
#include "router.cuh"
#include "swiglu.cuh"

namespace moetrain {

namespace {

constexpr int kSums = 4;

kernels::RouterDims router_dims(const RouterShape& s) {
  kernels::RouterDims d;
  d.tokens = s.tokens;
  d.n_experts = s.n_experts;
  d.top_k = s.top_k;
  d.sigmoid = s.type == RouterType::SigmoidBias;
  d.route_scale = s.route_scale;
  return d;
}

}  // namespace

CudaDevices probe_cuda_devices() {
  CudaDevices out;
  int count = 0;
  const cudaError_t rc = cudaGetDeviceCount(&count);
  if (rc != cudaSuccess) {
    cudaGetLastError();  // the runtime keeps the error sticky otherwise
    out.error = std::string("cudaGetDeviceCount: ") + cudaGetErrorName(rc) + " (" +
                cudaGetErrorString(rc) + ")";
    return out;
  }
  if (count == 0) {
    out.error = "cudaGetDeviceCount: 0 devices";
    return out;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) out.name = prop.name;
  out.count = count;
  return out;
}

std::unique_ptr<Backend<float>> make_cuda_backend(const CudaBackendOptions& options) {
  return std::make_unique<CudaBackend>(options);
}

void CudaBackend::synchronize() {
  refuse_in_capture("synchronize");
  ++syncs_;
  MOETRAIN_CUDA_CHECK(cudaStreamSynchronize(stream_));
  staging_used_ = 0;  // every upload enqueued so far has run: its staging bytes are free again
}

int CudaBackend::mark() {
  if (markers_used_ == markers_.size()) {
    cudaEvent_t e = nullptr;
    MOETRAIN_CUDA_CHECK(cudaEventCreate(&e));
    markers_.push_back(e);
  }
  MOETRAIN_CUDA_CHECK(cudaEventRecord(markers_[markers_used_], stream_));
  return int(markers_used_++);
}

double CudaBackend::seconds(int from, int to) {
  float ms = 0;
  MOETRAIN_CUDA_CHECK(
      cudaEventElapsedTime(&ms, markers_.at(std::size_t(from)), markers_.at(std::size_t(to))));
  return double(ms) * 1e-3;
}

void* CudaBackend::scratch(Scratch& s, std::size_t bytes) {
  if (bytes <= s.bytes) return s.ptr;
  refuse_in_capture("a scratch buffer's growth");
  drop_recordings();
  if (s.ptr) {
    synchronize();  // earlier launches may still read the old buffer
    MOETRAIN_CUDA_CHECK(cudaFree(s.ptr));
    s.ptr = nullptr;
    s.bytes = 0;
  }
  const std::size_t grown = std::max(bytes, std::size_t(1) << 20);
  MOETRAIN_CUDA_CHECK(cudaMalloc(&s.ptr, grown));
  s.bytes = grown;
  return s.ptr;
}

void CudaBackend::wrote(const void* dst, std::size_t bytes) {
  if (!weights_ || !bytes) return;
  const auto* lo = static_cast<const char*>(dst);
  const auto* w = reinterpret_cast<const char*>(weights_);
  if (lo < w + weight_count_ * sizeof(float) && w < lo + bytes) weight_copy_stale_ = true;
}

// ---- memory ---------------------------------------------------------------------------------

void* CudaBackend::alloc_bytes(std::size_t bytes) {
  refuse_in_capture("alloc_bytes");
  void* p = nullptr;
  const std::size_t rounded = std::max<std::size_t>((bytes + 63) / 64 * 64, 64);
  MOETRAIN_CUDA_CHECK(cudaMalloc(&p, rounded));  // 256-byte aligned
  MOETRAIN_CUDA_CHECK(cudaMemsetAsync(p, 0, rounded, stream_));
  return p;
}

// bf16 mode keeps activations in bf16 (docs/design.md §6.1), fp32 mode in fp32.
Storage CudaBackend::activation_storage() const {
  return bf16_ ? Storage::BF16 : Storage::F32;
}

int CudaBackend::head_chunk_rows(int rows, int vocab) const {
  // 64 Mi logits (128 MiB in bf16): one chunk for the configs of this repository; at 16 Ki tokens
  // of a 128 Ki vocabulary four chunks, each GEMM still 4 Ki rows.
  const long long chunk = std::max(1LL, (1LL << 26) / std::max(vocab, 1));
  return int(std::clamp<long long>(chunk, 1, std::max(rows, 1)));
}

std::size_t CudaBackend::available_memory_bytes() const {
  std::size_t free_bytes = 0, total_bytes = 0;
  if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) {
    cudaGetLastError();  // clear it: an unknown amount is not an error of a later call
    return ~std::size_t(0);
  }
  return free_bytes;
}

void CudaBackend::free_bytes(void* p) {
  if (!p) return;
  refuse_in_capture("free_bytes");
  drop_recordings();
  synchronize();
  if (p == weights_) {
    weights_ = nullptr;
    weight_count_ = 0;
  }
  MOETRAIN_CUDA_CHECK(cudaFree(p));
}

void CudaBackend::upload(void* dst, const void* src, std::size_t bytes) {
  if (!bytes) return;
  refuse_in_capture("upload");
  // The caller may reuse `src` as soon as this returns, so the bytes go through pinned staging
  // first; a staging byte is written again only after a synchronize() has run the copy that read
  // it. A step's uploads (tokens, targets, expert biases) fit, so they cost no synchronisation.
  if (!staging_) MOETRAIN_CUDA_CHECK(cudaMallocHost(&staging_, kStagingBytes));
  const auto* from = static_cast<const char*>(src);
  auto* to = static_cast<char*>(dst);
  for (std::size_t left = bytes; left > 0;) {
    if (staging_used_ == kStagingBytes) synchronize();
    const std::size_t chunk = std::min(left, kStagingBytes - staging_used_);
    char* stage = static_cast<char*>(staging_) + staging_used_;
    std::memcpy(stage, from, chunk);
    MOETRAIN_CUDA_CHECK(cudaMemcpyAsync(to, stage, chunk, cudaMemcpyHostToDevice, stream_));
    staging_used_ += chunk;
    from += chunk;
    to += chunk;
    left -= chunk;
  }
  wrote(dst, bytes);
}

void CudaBackend::download(void* dst, const void* src, std::size_t bytes) {
  if (!bytes) return;
  refuse_in_capture("download");
  MOETRAIN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
  synchronize();
}

void CudaBackend::copy(void* dst, const void* src, std::size_t bytes) {
  if (!bytes || dst == src) return;
  const auto* d = static_cast<const char*>(dst);
  const auto* s = static_cast<const char*>(src);
  if (d < s + bytes && s < d + bytes) {
    // cudaMemcpy does not allow overlap: go through scratch (the CPU backend's memmove).
    void* tmp = scratch(op_scratch_, bytes);
    MOETRAIN_CUDA_CHECK(cudaMemcpyAsync(tmp, src, bytes, cudaMemcpyDeviceToDevice, stream_));
    src = tmp;
  }
  MOETRAIN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
  wrote(dst, bytes);
}

void CudaBackend::zero(void* dst, std::size_t bytes) {
  if (!bytes) return;
  MOETRAIN_CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, stream_));
  wrote(dst, bytes);
}

// ---- elementwise and optimizer steps --------------------------------------------------------

void CudaBackend::add_inplace(DevPtr x, CDevPtr y, std::size_t n) {
  with_activation_type("add_inplace", {x, y}, [&](auto e) {
    using E = decltype(e);
    kernels::add_inplace(device_ptr<E>(x), device_ptr<E>(y), n, stream_);
  });
  wrote(x.get(), n * x.element_bytes());
}

double* CudaBackend::reduce_workspace() {
  return static_cast<double*>(
      scratch(op_scratch_, kernels::optimizer_workspace_elems() * sizeof(double)));
}

namespace {
const double* skip_of(const double* gate) {
  return gate ? gate + StepGate::kSkip : nullptr;
}
}  // namespace

void CudaBackend::sum_squares(const float* x, std::size_t n, double* acc) {
  if (!n) return;
  kernels::sum_squares(x, n, reduce_workspace(), acc, true, stream_);
}

void CudaBackend::scale_by(float* x, std::size_t n, const double* factor) {
  kernels::scale_by(x, n, factor, stream_);
  wrote(x, n * sizeof(float));
}

void CudaBackend::step_gate(double* gate, const double* rank_sums, int world, int per_rank,
                            double max_norm) {
  kernels::step_gate(gate, rank_sums, world, per_rank, max_norm, stream_);
}

void CudaBackend::qk_clip_factors(float* factors, double* clipped, const float* smax,
                                  const std::int32_t* mats, const QkClipShape& s,
                                  const double* gate) {
  const kernels::QkClipDims dims{s.matrices,   s.slots,    s.n_layers, s.n_heads,
                                 s.n_kv_heads, s.heads_ld, s.tau,      s.alpha};
  kernels::qk_clip_factors(factors, clipped, smax, mats, dims, skip_of(gate), stream_);
}

void CudaBackend::scale(float* x, std::size_t n, double s) {
  kernels::scale(x, n, float(s), stream_);
  wrote(x, n * sizeof(float));
}

void CudaBackend::axpby(float* y, const float* x, std::size_t n, double a, double b) {
  kernels::axpby(y, x, n, float(a), float(b), stream_);
  wrote(y, n * sizeof(float));
}

void CudaBackend::frobenius_normalize(float* x, int batch, std::size_t elems, double norm_scale,
                                      double eps) {
  if (!batch || !elems) return;
  auto* ws = static_cast<double*>(
      scratch(op_scratch_, kernels::frobenius_workspace_elems(batch, elems) * sizeof(double)));
  kernels::frobenius_normalize<float, float>(x, x, batch, elems, norm_scale, eps, ws, stream_);
  wrote(x, std::size_t(batch) * elems * sizeof(float));
}

void CudaBackend::adamw_update(float* p, const float* g, float* m, float* v, std::size_t n,
                               double lr, double beta1, double beta2, double eps,
                               double weight_decay, std::int64_t t, const double* gate,
                               double* acc) {
  if (!n) return;
  const auto params = kernels::adamw_params(lr, beta1, beta2, eps, weight_decay, t);
  // fp32 masters only: the bf16 copy is rewritten as a whole when a GEMM next reads it.
  kernels::adamw_update<float>(p, nullptr, g, 1.0f, m, v, n, params, seed_, 0, skip_of(gate),
                               reduce_workspace(), acc, true, stream_);
  wrote(p, n * sizeof(float));
}

void CudaBackend::muon_momentum(float* M, float* U, const float* G, std::size_t n, double mu,
                                bool nesterov, const double* gate) {
  kernels::muon_momentum<float>(M, U, G, 1.0f, n, float(mu), nesterov, skip_of(gate), stream_);
  wrote(M, n * sizeof(float));
  wrote(U, n * sizeof(float));
}

void CudaBackend::muon_update(float* W, const float* O, std::size_t n, double lr, double s,
                              double weight_decay, const double* gate, double* acc) {
  if (!n) return;
  kernels::muon_update<float, float>(W, nullptr, O, n, float(lr), float(s), float(weight_decay),
                                     seed_, 0, skip_of(gate), reduce_workspace(), acc, true,
                                     stream_);
  wrote(W, n * sizeof(float));
}

void CudaBackend::sign_inplace(float* x, std::size_t n) {
  kernels::sign_inplace(x, n, stream_);
  wrote(x, n * sizeof(float));
}

void CudaBackend::second_moment_normalize(float* O, float* v, int batch, int rows, int cols,
                                          bool per_row, double beta, double eps, double target_norm,
                                          const double* gate) {
  if (batch <= 0 || rows <= 0 || cols <= 0) return;
  auto* ws = static_cast<double*>(
      scratch(op_scratch_, kernels::second_moment_workspace_elems(batch, rows) * sizeof(double)));
  kernels::second_moment_normalize(O, v, batch, rows, cols, per_row, float(beta), float(eps),
                                   target_norm, ws, skip_of(gate), stream_);
  const std::size_t elems = std::size_t(batch) * std::size_t(rows) * std::size_t(cols);
  wrote(O, elems * sizeof(float));
  wrote(v, (per_row ? std::size_t(batch) * std::size_t(rows) : elems) * sizeof(float));
}

void CudaBackend::lerp_update(float* x, const float* y, std::size_t n, double beta,
                              const double* gate) {
  kernels::lerp_update(x, y, n, float(beta), skip_of(gate), stream_);
  wrote(x, n * sizeof(float));
}

void CudaBackend::soap_precondition(float* D, float* v, const float* m, const float* g,
                                    std::size_t n, double beta2, double eps, const double* gate) {
  kernels::soap_precondition(D, v, m, g, n, float(beta2), float(eps), skip_of(gate), stream_);
  wrote(D, n * sizeof(float));
  wrote(v, n * sizeof(float));
}

void CudaBackend::scale_row_blocks(float* x, int blocks, std::size_t block_elems,
                                   const float* factors) {
  kernels::scale_row_blocks<float>(x, nullptr, blocks, block_elems, factors, stream_);
  wrote(x, std::size_t(blocks) * block_elems * sizeof(float));
}

// ---- embedding, norms, RoPE, SwiGLU, cross-entropy -----------------------------------------
// Activations in their storage (f32, or bf16 in bf16 mode); tables, gains, their gradients and the
// statistics are fp32.

void CudaBackend::embedding_forward(DevPtr out, const int32_t* tokens, const float* table, int n,
                                    int d) {
  with_activation_type("embedding_forward", {out}, [&](auto e) {
    using E = decltype(e);
    kernels::embedding_forward(device_ptr<E>(out), tokens, table, n, d, stream_);
  });
}

void CudaBackend::embedding_backward(float* dtable, CDevPtr dout, const int32_t* tokens, int n,
                                     int d) {
  void* ws = scratch(op_scratch_, kernels::embedding_backward_workspace_bytes(n));
  with_activation_type("embedding_backward", {dout}, [&](auto e) {
    using E = decltype(e);
    kernels::embedding_backward(dtable, device_ptr<E>(dout), tokens, n, d, ws, stream_);
  });
}

void CudaBackend::rmsnorm_forward(DevPtr out, float* rstd, CDevPtr x, const float* gain, int n,
                                  int d, double eps) {
  with_activation_type("rmsnorm_forward", {out, x}, [&](auto e) {
    using E = decltype(e);
    kernels::rmsnorm_forward(device_ptr<E>(out), rstd, device_ptr<E>(x), gain, n, d, float(eps),
                             stream_);
  });
}

void CudaBackend::rmsnorm_backward(DevPtr dx, float* dgain, CDevPtr dout, CDevPtr x,
                                   const float* gain, const float* rstd, int n, int d) {
  void* ws = scratch(op_scratch_, kernels::rmsnorm_backward_workspace_bytes(n, d));
  with_activation_type("rmsnorm_backward", {dx, dout, x}, [&](auto e) {
    using E = decltype(e);
    kernels::rmsnorm_backward(device_ptr<E>(dx), dgain, device_ptr<E>(dout), device_ptr<E>(x), gain,
                              rstd, n, d, ws, stream_);
  });
}

void CudaBackend::rope_forward(DevPtr x, int ld, int rows, int seq, int n_heads, int head_dim,
                               const float* cos, const float* sin) {
  with_activation_type("rope_forward", {x}, [&](auto e) {
    using E = decltype(e);
    kernels::rope_forward(device_ptr<E>(x), ld, rows, seq, n_heads, head_dim, cos, sin, stream_);
  });
}

void CudaBackend::rope_backward(DevPtr dx, int ld, int rows, int seq, int n_heads, int head_dim,
                                const float* cos, const float* sin) {
  with_activation_type("rope_backward", {dx}, [&](auto e) {
    using E = decltype(e);
    kernels::rope_backward(device_ptr<E>(dx), ld, rows, seq, n_heads, head_dim, cos, sin, stream_);
  });
}

void CudaBackend::swiglu_forward(DevPtr out, CDevPtr h, int rows, int ff) {
  with_activation_type("swiglu_forward", {out, h}, [&](auto e) {
    using E = decltype(e);
    kernels::swiglu_forward(device_ptr<E>(out), device_ptr<E>(h), rows, ff, stream_);
  });
}

void CudaBackend::swiglu_backward(DevPtr dh, CDevPtr dout, CDevPtr h, int rows, int ff) {
  with_activation_type("swiglu_backward", {dh, dout, h}, [&](auto e) {
    using E = decltype(e);
    kernels::swiglu_backward(device_ptr<E>(dh), device_ptr<E>(dout), device_ptr<E>(h), rows, ff,
                             stream_);
  });
}

void CudaBackend::cross_entropy(float* losses, double* loss_sum, DevPtr logits,
                                const int32_t* targets, int n, int vocab, const float* grad_scale) {
  with_activation_type("cross_entropy", {logits}, [&](auto e) {
    using E = decltype(e);
    kernels::cross_entropy(losses, device_ptr<E>(logits), targets, n, vocab, grad_scale, stream_);
  });
  if (loss_sum && n > 0)
    kernels::sum(losses, std::size_t(n), reduce_workspace(), loss_sum, true, stream_);
}

// ---- MoE ------------------------------------------------------------------------------------

void CudaBackend::router_forward(float* scores, int32_t* topk, float* gates, int32_t* counts,
                                 float* stats, const float* logits, const float* bias,
                                 const RouterShape& s) {
  void* ws = scratch(op_scratch_, kernels::router_forward_workspace_bytes(s.tokens, s.n_experts));
  kernels::router_forward(scores, topk, gates, counts, stats, logits, bias, router_dims(s), ws,
                          stream_);
}

void CudaBackend::router_backward(float* dlogits, const float* dgates, const float* logits,
                                  const float* scores, const int32_t* topk, const float* gates,
                                  const int32_t* counts, const RouterShape& s, double aux_coef,
                                  double z_coef, double grad_scale) {
  kernels::router_backward(dlogits, dgates, logits, scores, topk, gates, counts, router_dims(s),
                           aux_coef, z_coef, grad_scale, stream_);
}

void CudaBackend::moe_permute(DevPtr xg, int32_t* pos, int32_t* offsets, CDevPtr x,
                              const int32_t* topk, const int32_t* counts, int tokens, int d,
                              int n_experts, int k) {
  void* ws = scratch(op_scratch_, kernels::moe_permute_workspace_bytes(tokens, n_experts, k));
  with_activation_type("moe_permute", {xg, x}, [&](auto e) {
    using E = decltype(e);
    kernels::moe_permute(device_ptr<E>(xg), pos, offsets, device_ptr<E>(x), topk, counts, tokens, d,
                         n_experts, k, ws, stream_);
  });
}

void CudaBackend::moe_permute_backward(DevPtr dx, CDevPtr dxg, const int32_t* pos, int tokens,
                                       int d, int k) {
  with_activation_type("moe_permute_backward", {dx, dxg}, [&](auto e) {
    using E = decltype(e);
    kernels::moe_permute_backward(device_ptr<E>(dx), device_ptr<E>(dxg), pos, tokens, d, k,
                                  stream_);
  });
}

void CudaBackend::moe_unpermute(DevPtr y, CDevPtr yg, const float* gates, const int32_t* pos,
                                int tokens, int d, int k) {
  with_activation_type("moe_unpermute", {y, yg}, [&](auto e) {
    using E = decltype(e);
    kernels::moe_unpermute(device_ptr<E>(y), device_ptr<E>(yg), gates, pos, tokens, d, k, stream_);
  });
}

void CudaBackend::moe_unpermute_backward(DevPtr dyg, float* dgates, CDevPtr dy, CDevPtr yg,
                                         const float* gates, const int32_t* pos, int tokens, int d,
                                         int k) {
  with_activation_type("moe_unpermute_backward", {dyg, dy, yg}, [&](auto e) {
    using E = decltype(e);
    kernels::moe_unpermute_backward(device_ptr<E>(dyg), dgates, device_ptr<E>(dy),
                                    device_ptr<E>(yg), gates, pos, tokens, d, k, stream_);
  });
}

}  // namespace moetrain
