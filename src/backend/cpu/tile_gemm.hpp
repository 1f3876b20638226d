// Small dense products inside the CPU's fused kernels (attention's 64 x 64 tiles), run on the
// calling thread:
//   C[m][0:N] = (accumulate ? C[m][0:N] : 0) + alpha * sum over k < K of a(m, k) * B[k][0:N],
//   a(m, k) = A[m * a_row + k * a_col]   (A, or its transpose, at any strides),
// for m < M. Every element's sum runs over k in order, so a result depends neither on M or N nor on
// the thread. The AVX-512, AVX2 and baseline forms are picked at load time by the CPU (like
// vector_exp.hpp's, not by -march); the first two fuse each multiply-add, the baseline rounds the
// product first, so across instruction-set levels the last bits may differ.
//
// Why not BLAS: the caller parallelises over tiles itself, and OpenBLAS is not safe to call from
// several OpenMP threads at once (its buffer pool, NUM_PARALLEL); asking it for one thread
// (openblas_set_num_threads) sets OpenMP's thread count too, which made the caller's own loop run
// on one thread.
#pragma once

#include <cstddef>
#include <cstdint>

#include "backend/cpu/bf16.hpp"

namespace moetrain::cpu {

void tile_gemm(int M, int N, int K, float alpha, const float* A, std::ptrdiff_t a_row,
               std::ptrdiff_t a_col, const float* B, int ldb, float* C, int ldc, bool accumulate);
void tile_gemm(int M, int N, int K, double alpha, const double* A, std::ptrdiff_t a_row,
               std::ptrdiff_t a_col, const double* B, int ldb, double* C, int ldc, bool accumulate);

// The same product on bf16 operands with fp32 accumulation (attention's tiles under
// train.precision = bf16), the summed dimension in pairs: A[m * lda + p] and B[p * ldb + n] each
// hold the bf16 pair (k = 2p, 2p + 1) as bf16_pair makes it, for p < K2 (an odd K is padded with a
// zero). Every element adds, per p in order, a(2p+1) b(2p+1) and then a(2p) b(2p) to its fp32
// sum: AVX-512-BF16's vdpbf16ps where the CPU has it (`hardware`), otherwise the same two fp32 adds
// of the same exact products, so the two forms differ only where vdpbf16ps flushes denormals.
void tile_gemm_bf16(int M, int N, int K2, float alpha, const std::uint32_t* A, int lda,
                    const std::uint32_t* B, int ldb, float* C, int ldc, bool accumulate);
void tile_gemm_bf16(int M, int N, int K2, float alpha, const std::uint32_t* A, int lda,
                    const std::uint32_t* B, int ldb, float* C, int ldc, bool accumulate,
                    bool hardware);
// Whether this CPU (and OS) runs AVX-512-BF16; found once.
bool cpu_has_avx512_bf16();

// The pair layouts of tile_gemm_bf16's operands from fp32 or bf16 data x(i, j) = x[i * is + j * js]
// (X: float or bf16, instantiated for both):
//   pack_pairs_a: dst[r * ldd + p] = (x(r, 2p), x(r, 2p + 1)) for r < rows, p < ceil(k / 2);
//   pack_pairs_b: dst[p * ldd + n] = (x(2p, n), x(2p + 1, n)) for p < ceil(k / 2), n < cols;
// an element past k is 0.
template <typename X>
void pack_pairs_a(std::uint32_t* dst, int ldd, const X* x, std::ptrdiff_t is, std::ptrdiff_t js,
                  int rows, int k);
template <typename X>
void pack_pairs_b(std::uint32_t* dst, int ldd, const X* x, std::ptrdiff_t is, std::ptrdiff_t js,
                  int k, int cols);

// dst[c * ldd + r] = src[r * ld + c] for r < rows, c < cols: a block's transpose, so that a
// product with B^T (attention's Q K^T) reads B's columns as rows. In 16 x 16 squares, so that the
// reads and the writes each touch 16 cache lines at a time (a whole column of writes at once, one
// line per element, was 7% of attention's time). D may be another type than S (fp32 sums into
// bf16).
template <typename D, typename S>
void transpose_block(D* dst, int ldd, const S* src, int rows, int cols, int ld) {
  constexpr int kSquare = 16;
  for (int r0 = 0; r0 < rows; r0 += kSquare)
    for (int c0 = 0; c0 < cols; c0 += kSquare) {
      const int r1 = r0 + kSquare < rows ? r0 + kSquare : rows;
      const int c1 = c0 + kSquare < cols ? c0 + kSquare : cols;
      for (int c = c0; c < c1; ++c)
        for (int r = r0; r < r1; ++r)
          dst[std::size_t(c) * std::size_t(ldd) + std::size_t(r)] =
              D(src[std::size_t(r) * std::size_t(ld) + std::size_t(c)]);
    }
}
// The transpose stored densely: dst [cols, rows].
template <typename T>
void transpose_block(T* dst, const T* src, int rows, int cols, int ld) {
  transpose_block(dst, rows, src, rows, cols, ld);
}

}  // namespace moetrain::cpu
