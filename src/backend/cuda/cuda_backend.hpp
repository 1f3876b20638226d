// CudaBackend: the Backend on one GPU. Every op is a kernel of kernels/ (or a cuBLASLt GEMM) on the
// backend's own stream; results the interface returns to the host (sums of squares) and downloads
// synchronise that stream. The same source builds twice: against the CUDA toolkit (nvcc kernels,
// cuBLASLt) and against the SIMT simulator (tests/simt), where GEMMs run on the CPU backend.
//
// Precision: activations, gradients, optimizer state and the master weights are fp32. In bf16 mode
// the GEMMs read bf16 operands and accumulate in fp32: activations are rounded to nearest on their
// way in, and weights come from a bf16 copy of the master weights, rewritten with stochastic
// rounding whenever the masters change (the backend sees every write into the weight buffer).
#pragma once

#include <cstdint>
#include <vector>

#include "common.cuh"
#include "moetrain/cuda_backend.hpp"

namespace moetrain {

class CudaBackend final : public Backend<float> {
 public:
  explicit CudaBackend(const CudaBackendOptions& options);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  const char* name() const override { return bf16_ ? "cuda-bf16" : "cuda-fp32"; }
  cudaStream_t stream() const { return stream_; }
  void synchronize();

  void* alloc_bytes(std::size_t bytes) override;
  void free_bytes(void* p) override;
  void upload(void* dst, const void* host_src, std::size_t bytes) override;
  void download(void* host_dst, const void* src, std::size_t bytes) override;
  void copy(void* dst, const void* src, std::size_t bytes) override;
  void zero(void* dst, std::size_t bytes) override;
  void set_weights(const float* weights, std::size_t count) override;

  void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
            const float* B, int ldb, float beta, float* C, int ldc) override;
  void gemm_batched(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A,
                    int lda, std::size_t stride_a, const float* B, int ldb, std::size_t stride_b,
                    float beta, float* C, int ldc, std::size_t stride_c, int batch) override;

  void add(float* out, const float* a, const float* b, std::size_t n) override;
  void add_inplace(float* x, const float* y, std::size_t n) override;
  double sum_squares(const float* x, std::size_t n) override;
  void scale(float* x, std::size_t n, double s) override;
  void axpby(float* y, const float* x, std::size_t n, double a, double b) override;
  void transpose_batched(float* out, const float* in, int batch, int rows, int cols) override;
  void frobenius_normalize(float* x, int batch, std::size_t elems, double eps) override;
  double adamw_update(float* p, const float* g, float* m, float* v, std::size_t n, double lr,
                      double beta1, double beta2, double eps, double weight_decay,
                      std::int64_t t) override;
  void muon_momentum(float* M, float* U, const float* G, std::size_t n, double mu,
                     bool nesterov) override;
  double muon_update(float* W, const float* O, std::size_t n, double lr, double s,
                     double weight_decay) override;

  void embedding_forward(float* out, const int32_t* tokens, const float* table, int n,
                         int d) override;
  void embedding_backward(float* dtable, const float* dout, const int32_t* tokens, int n,
                          int d) override;
  void rmsnorm_forward(float* out, float* rstd, const float* x, const float* gain, int n, int d,
                       double eps) override;
  void rmsnorm_backward(float* dx, float* dgain, const float* dout, const float* x,
                        const float* gain, const float* rstd, int n, int d) override;
  void rope_forward(float* x, int ld, int rows, int seq, int n_heads, int head_dim,
                    const float* cos, const float* sin) override;
  void rope_backward(float* dx, int ld, int rows, int seq, int n_heads, int head_dim,
                     const float* cos, const float* sin) override;
  std::size_t attention_saved_elems(const AttentionShape& s) const override;
  void attention_forward(float* out, float* saved, float* smax, const float* qkv,
                         const AttentionShape& s) override;
  void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* saved,
                          const AttentionShape& s) override;
  void swiglu_forward(float* out, const float* h, int rows, int ff) override;
  void swiglu_backward(float* dh, const float* dout, const float* h, int rows, int ff) override;
  void cross_entropy(float* losses, float* logits, const int32_t* targets, int n, int vocab,
                     float grad_scale) override;
  void router_forward(float* scores, int32_t* topk, float* gates, int32_t* counts, float* stats,
                      const float* logits, const float* bias, const RouterShape& s) override;
  void router_backward(float* dlogits, const float* dgates, const float* logits,
                       const float* scores, const int32_t* topk, const float* gates,
                       const int32_t* counts, const RouterShape& s, double aux_coef, double z_coef,
                       double grad_scale) override;
  void moe_permute(float* xg, int32_t* pos, int32_t* offsets, const float* x, const int32_t* topk,
                   const int32_t* counts, int tokens, int d, int n_experts, int k) override;
  void moe_permute_backward(float* dx, const float* dxg, const int32_t* pos, int tokens, int d,
                            int k) override;
  void moe_unpermute(float* y, const float* yg, const float* gates, const int32_t* pos, int tokens,
                     int d, int k) override;
  void moe_unpermute_backward(float* dyg, float* dgates, const float* dy, const float* yg,
                              const float* gates, const int32_t* pos, int tokens, int d,
                              int k) override;

  // The bf16 copy of the weights as the GEMMs would read it now (refreshed if stale); null in
  // fp32 mode or before set_weights. For tests.
  const __nv_bfloat16* weight_copy();

 private:
  // A grow-only device buffer: reused by consecutive ops on the one stream.
  struct Scratch {
    void* ptr = nullptr;
    std::size_t bytes = 0;
  };
  void* scratch(Scratch& s, std::size_t bytes);
  // The stream's pending reductions land in sums_ (device doubles); read one back.
  double read_sum(int index);
  // Marks the bf16 weight copy stale when [dst, dst + bytes) overlaps the weights.
  void wrote(const void* dst, std::size_t bytes);
  // A GEMM operand as the GEMM reads it: the bf16 weight copy, a rounded copy, or the fp32 data.
  const void* gemm_operand(const float* X, bool trans, int rows, int cols, int ld,
                           std::size_t stride, int batch, Scratch& buf);
  void gemm_impl(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A,
                 int lda, std::size_t stride_a, const float* B, int ldb, std::size_t stride_b,
                 float beta, float* C, int ldc, std::size_t stride_c, int batch);

  bool bf16_;
  std::uint64_t seed_;
  cudaStream_t stream_ = nullptr;
  void* blas_ = nullptr;  // cublasLtHandle_t in the CUDA build (opaque: no cuBLAS in this header)
  Scratch blas_workspace_, op_scratch_, gemm_a_, gemm_b_;
  Scratch sim_a_, sim_b_;   // simulator build: the widened GEMM operands
  Scratch attention_;       // attention backward: dP / dS
  double* sums_ = nullptr;  // a few device doubles for reductions returned to the host

  const float* weights_ = nullptr;
  std::size_t weight_count_ = 0;
  __nv_bfloat16* weight_copy_ = nullptr;
  bool weight_copy_stale_ = true;
  std::uint64_t weight_copy_version_ = 0;
};

}  // namespace moetrain
