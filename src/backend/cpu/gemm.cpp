// GEMM through OpenBLAS (row-major): the double backend's GEMM ops (the float backend's are
// oneDNN's, onednn_matmul.cpp). Each call uses OpenBLAS's own (OpenMP) threads; a batch runs its
// matrices one after another, since OpenBLAS is not safe to call from several threads at once.
#include <cblas.h>

#include "backend/cpu/gram.hpp"
#include "backend/cpu/grouped_gemm.hpp"
#include "backend/cpu/ops.hpp"

namespace moetrain::cpu {

namespace {
CBLAS_TRANSPOSE tr(bool t) {
  return t ? CblasTrans : CblasNoTrans;
}
}  // namespace

template <typename T>
void gemm(bool trans_a, bool trans_b, int M, int N, int K, T alpha, const T* A, int lda, const T* B,
          int ldb, T beta, T* C, int ldc) {
  if (M == 0 || N == 0) return;
  if constexpr (sizeof(T) == sizeof(float))
    cblas_sgemm(CblasRowMajor, tr(trans_a), tr(trans_b), M, N, K, alpha, A, lda, B, ldb, beta, C,
                ldc);
  else
    cblas_dgemm(CblasRowMajor, tr(trans_a), tr(trans_b), M, N, K, alpha, A, lda, B, ldb, beta, C,
                ldc);
}

template <typename T>
void gemm_batched(bool trans_a, bool trans_b, int M, int N, int K, T alpha, const T* A, int lda,
                  std::size_t stride_a, const T* B, int ldb, std::size_t stride_b, T beta, T* C,
                  int ldc, std::size_t stride_c, int batch) {
  for (int i = 0; i < batch; ++i)
    gemm<T>(trans_a, trans_b, M, N, K, alpha, A + stride_a * std::size_t(i), lda,
            B + stride_b * std::size_t(i), ldb, beta, C + stride_c * std::size_t(i), ldc);
}

template <typename T>
void grouped_gemm(bool trans_b, int rows, int N, int K, T alpha, const T* A, int lda, const T* B,
                  int ldb, std::size_t stride_b, T beta, T* C, int ldc, const std::int32_t* offsets,
                  int groups) {
  grouped_gemm_with<T>(gemm<T>, trans_b, rows, N, K, alpha, A, lda, B, ldb, stride_b, beta, C, ldc,
                       offsets, groups);
}

template <typename T>
void grouped_gemm_wgrad(int rows, int M, int N, T alpha, const T* A, int lda, const T* B, int ldb,
                        T* C, int ldc, std::size_t stride_c, const std::int32_t* offsets,
                        int groups) {
  grouped_gemm_wgrad_with<T>(gemm<T>, rows, M, N, alpha, A, lda, B, ldb, C, ldc, stride_c, offsets,
                             groups);
}

// Gram products through BLAS's syrk (the upper triangle), then mirrored.
template <typename T>
void symmetric_gemm_batched(bool trans, int n, int k, T alpha, const T* X, int ldx,
                            std::size_t stride_x, T beta, const T* C, int ldc, std::size_t stride_c,
                            T shift, T* D, int ldd, std::size_t stride_d, int batch) {
  if (n <= 0 || batch <= 0) return;
  check_gram_sum(k);
  for (int b = 0; b < batch; ++b) {
    const T* x = X + stride_x * std::size_t(b);
    T* d = D + stride_d * std::size_t(b);
    if (beta != T(0) && C + stride_c * std::size_t(b) != d)
      copy_upper(d, ldd, C + stride_c * std::size_t(b), ldc, n);
    if constexpr (sizeof(T) == sizeof(float))
      cblas_ssyrk(CblasRowMajor, CblasUpper, tr(trans), n, k, alpha, x, ldx, beta, d, ldd);
    else
      cblas_dsyrk(CblasRowMajor, CblasUpper, tr(trans), n, k, alpha, x, ldx, beta, d, ldd);
    shift_and_mirror_upper(d, ldd, n, shift);
  }
}

MOETRAIN_OPS_GEMM(MOETRAIN_CPU_INSTANTIATE_F64, double, double*, const double*)

}  // namespace moetrain::cpu
