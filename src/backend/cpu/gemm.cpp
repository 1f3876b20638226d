// GEMM through OpenBLAS (row-major). Large GEMMs use OpenBLAS's own (OpenMP) threads; callers
// that parallelise over many small GEMMs hold a SingleThreadedBlas.
#include <cblas.h>

#include "backend/cpu/ops.hpp"

namespace moetrain::cpu {

namespace {
CBLAS_TRANSPOSE tr(bool t) {
  return t ? CblasTrans : CblasNoTrans;
}
}  // namespace

SingleThreadedBlas::SingleThreadedBlas() : saved_(openblas_get_num_threads()) {
  openblas_set_num_threads(1);
}
SingleThreadedBlas::~SingleThreadedBlas() {
  openblas_set_num_threads(saved_);
}

template <>
void gemm<float>(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A,
                 int lda, const float* B, int ldb, float beta, float* C, int ldc) {
  if (M == 0 || N == 0) return;
  cblas_sgemm(CblasRowMajor, tr(trans_a), tr(trans_b), M, N, K, alpha, A, lda, B, ldb, beta, C,
              ldc);
}

template <>
void gemm<double>(bool trans_a, bool trans_b, int M, int N, int K, double alpha, const double* A,
                  int lda, const double* B, int ldb, double beta, double* C, int ldc) {
  if (M == 0 || N == 0) return;
  cblas_dgemm(CblasRowMajor, tr(trans_a), tr(trans_b), M, N, K, alpha, A, lda, B, ldb, beta, C,
              ldc);
}

// Many small GEMMs (Newton-Schulz over all experts of a layer): one per thread at a time.
template <typename T>
void gemm_batched(bool trans_a, bool trans_b, int M, int N, int K, T alpha, const T* A, int lda,
                  std::size_t stride_a, const T* B, int ldb, std::size_t stride_b, T beta, T* C,
                  int ldc, std::size_t stride_c, int batch) {
  if (batch == 1) {
    gemm<T>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  SingleThreadedBlas one_thread_each;
#pragma omp parallel for schedule(dynamic, 1)
  for (int i = 0; i < batch; ++i)
    gemm<T>(trans_a, trans_b, M, N, K, alpha, A + stride_a * std::size_t(i), lda,
            B + stride_b * std::size_t(i), ldb, beta, C + stride_c * std::size_t(i), ldc);
}

template void gemm_batched<float>(bool, bool, int, int, int, float, const float*, int, std::size_t,
                                  const float*, int, std::size_t, float, float*, int, std::size_t,
                                  int);
template void gemm_batched<double>(bool, bool, int, int, int, double, const double*, int,
                                   std::size_t, const double*, int, std::size_t, double, double*,
                                   int, std::size_t, int);

}  // namespace moetrain::cpu
