// tile_gemm (src/backend/cpu/tile_gemm.hpp), the CPU's in-kernel tile products, against double
// sums: every shape class (whole and partial row blocks and vectors, the scalar tail), A and its
// transpose through strides, accumulate or overwrite, and the same bits for a row whatever M.
#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

#include "backend/cpu/tile_gemm.hpp"
#include "moetrain/rng.hpp"

using moetrain::cpu::tile_gemm;
using moetrain::cpu::transpose_block;

TEST_CASE("tile_gemm equals double sums over every shape class, transposes and accumulation",
          "[cpu][tile_gemm]") {
  moetrain::Rng rng(11);
  for (const int M : {1, 3, 4, 7, 64})
    for (const int N : {1, 5, 16, 17, 48, 64, 70})
      for (const int K : {0, 1, 9, 64})
        for (const bool trans : {false, true})
          for (const bool accumulate : {false, true}) {
            INFO("M " << M << " N " << N << " K " << K << " trans " << trans << " accumulate "
                      << accumulate);
            // A stored [M, K] at stride K + 3, or [K, M] at stride M + 2 (read transposed).
            const int lda = trans ? M + 2 : K + 3, ldb = N + 1, ldc = N + 4;
            std::vector<float> A(std::size_t(trans ? K : M) * lda + 1), B(std::size_t(K) * ldb + 1),
                C(std::size_t(M) * ldc);
            for (auto* v : {&A, &B, &C})
              for (float& x : *v) x = float(rng.uniform() - 0.5);
            const std::vector<float> C0 = C;
            const std::ptrdiff_t a_row = trans ? 1 : lda, a_col = trans ? lda : 1;
            const float alpha = 0.75f;
            tile_gemm(M, N, K, alpha, A.data(), a_row, a_col, B.data(), ldb, C.data(), ldc,
                      accumulate);
            double worst = 0;
            for (int m = 0; m < M; ++m)
              for (int n = 0; n < ldc; ++n) {
                const std::size_t at = std::size_t(m) * ldc + n;
                if (n >= N) {  // beyond N: untouched
                  CHECK(C[at] == C0[at]);
                  continue;
                }
                double s = 0, mag = 0;
                for (int k = 0; k < K; ++k) {
                  const double p = double(A[std::size_t(m * a_row + k * a_col)]) *
                                   double(B[std::size_t(k) * ldb + n]);
                  s += p;
                  mag += std::abs(p);
                }
                const double want = (accumulate ? double(C0[at]) : 0.0) + double(alpha) * s;
                const double err = std::abs(double(C[at]) - want) /
                                   (double(alpha) * mag + std::abs(double(C0[at])) + 1e-30);
                worst = std::max(worst, err);
              }
            CHECK(worst <= 1e-6);
          }
}

TEST_CASE("tile_gemm: a row's result does not depend on how many rows are computed with it",
          "[cpu][tile_gemm]") {
  moetrain::Rng rng(5);
  const int M = 7, N = 40, K = 33;
  std::vector<double> A(std::size_t(M) * K), B(std::size_t(K) * N), all(std::size_t(M) * N),
      one(static_cast<std::size_t>(N));
  for (auto* v : {&A, &B})
    for (double& x : *v) x = rng.uniform() - 0.5;
  tile_gemm(M, N, K, 1.0, A.data(), K, 1, B.data(), N, all.data(), N, false);
  for (int m = 0; m < M; ++m) {
    tile_gemm(1, N, K, 1.0, A.data() + std::size_t(m) * K, K, 1, B.data(), N, one.data(), N, false);
    for (int n = 0; n < N; ++n) CHECK(one[std::size_t(n)] == all[std::size_t(m) * N + n]);
  }
}

TEST_CASE("transpose_block swaps rows and columns at any source stride", "[cpu][tile_gemm]") {
  const int rows = 5, cols = 3, ld = 7;
  std::vector<int> src(std::size_t(rows) * ld), dst(std::size_t(rows) * cols, -1);
  for (std::size_t i = 0; i < src.size(); ++i) src[i] = int(i);
  transpose_block(dst.data(), src.data(), rows, cols, ld);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) CHECK(dst[std::size_t(c) * rows + r] == r * ld + c);
}
