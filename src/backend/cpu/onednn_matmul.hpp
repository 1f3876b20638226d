// The CPU backend's float GEMMs on oneDNN's matmul: fp32 operands, or (train.precision = bf16)
// bf16 operands: bf16 activations read in place, fp32 data rounded to nearest even (weights from a
// bf16 copy of the parameter buffer, other fp32 operands packed per call); fp32 accumulation, and
// C in its own storage (fp32, or bf16 activations rounded once from the fp32 sum). oneDNN picks its
// kernel from the CPU at run time (AMX, AVX-512-BF16, AVX-512, AVX2); on the model's skinny
// products (K = d_model) its fp32 kernels are faster than OpenBLAS's sgemm, and bf16 about twice as
// fast again where the CPU has BF16 units; one batched primitive beats a matrix per thread on
// OpenBLAS for Newton-Schulz's products. Double (the finite-difference checks) and the GEMMs inside
// attention's tiles stay on OpenBLAS (gemm.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "moetrain/dev_ptr.hpp"

namespace moetrain::cpu {

class OnednnMatmul {
 public:
  explicit OnednnMatmul(bool bf16);
  ~OnednnMatmul();
  OnednnMatmul(const OnednnMatmul&) = delete;
  OnednnMatmul& operator=(const OnednnMatmul&) = delete;

  // bf16: the model's parameter buffer (backend_ops.hpp's set_weights). Products read a weight
  // operand from a bf16 copy of it, rewritten whole on first use after a write that overlaps it,
  // instead of rounding the weights again on every call.
  void set_weights(const float* weights, std::size_t count);
  // bf16: other operands are rounded into packed copies that later products reuse while their
  // source is unchanged: a linear layer's dy feeds its dx and its dW product, an expert's slice of
  // dy (of dh) its dact (dxg) and its weight gradient, a Gram product's X both operands. Every
  // write that may touch a source must be reported before the next product: `wrote` for known
  // bytes (memory ops), `op_wrote` for an op's output of unknown extent (it also drops every
  // packed copy). A product's own C is handled inside (its extent is known).
  void wrote(const void* dst, std::size_t bytes);
  void op_wrote(const void* dst);

  // Row-major C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C (backend_ops.hpp's gemm).
  // A, B, C: fp32, or bf16 (bf16 mode only).
  void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, CDevPtr A, int lda,
            CDevPtr B, int ldb, float beta, DevPtr C, int ldc);
  // backend_ops.hpp's gemm_batched: one batched primitive for all matrices.
  void gemm_batched(bool trans_a, bool trans_b, int M, int N, int K, float alpha, CDevPtr A,
                    int lda, std::size_t stride_a, CDevPtr B, int ldb, std::size_t stride_b,
                    float beta, DevPtr C, int ldc, std::size_t stride_c, int batch);
  // backend_ops.hpp's symmetric_gemm_batched.
  void symmetric_gemm_batched(bool trans, int n, int k, float alpha, const float* X, int ldx,
                              std::size_t stride_x, float beta, const float* C, int ldc,
                              std::size_t stride_c, float shift, float* D, int ldd,
                              std::size_t stride_d, int batch);
  // backend_ops.hpp's grouped_gemm and grouped_gemm_wgrad, one product per non-empty group.
  void grouped_gemm(bool trans_b, int rows, int N, int K, float alpha, CDevPtr A, int lda,
                    CDevPtr B, int ldb, std::size_t stride_b, float beta, DevPtr C, int ldc,
                    const std::int32_t* offsets, int groups);
  void grouped_gemm_wgrad(int rows, int M, int N, float alpha, CDevPtr A, int lda, CDevPtr B,
                          int ldb, DevPtr C, int ldc, std::size_t stride_c,
                          const std::int32_t* offsets, int groups);

 private:
  struct Impl;
  bool bf16_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moetrain::cpu
