// tile_gemm (src/backend/cpu/tile_gemm.hpp), the CPU's in-kernel tile products, against double
// sums: every shape class (whole and partial row blocks and vectors, the scalar tail), A and its
// transpose through strides, accumulate or overwrite, and the same bits for a row whatever M; and
// its bf16 form with the pair packing.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <vector>

#include "backend/cpu/bf16.hpp"
#include "backend/cpu/tile_gemm.hpp"
#include "moetrain/rng.hpp"

using moetrain::cpu::tile_gemm;
using moetrain::cpu::transpose_block;

namespace {
// The largest error of C[M, N] (stride ldc) against C0 (if accumulate) + alpha sum_k term(m, k, n)
// in double, relative to alpha sum_k |term| + |C0|; the columns past N must be C0's.
template <typename Term>
double worst_error(const std::vector<float>& C, const std::vector<float>& C0, int M, int N, int K,
                   int ldc, float alpha, bool accumulate, Term term) {
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
        const double p = term(m, k, n);
        s += p;
        mag += std::abs(p);
      }
      const double want = (accumulate ? double(C0[at]) : 0.0) + double(alpha) * s;
      worst = std::max(worst, std::abs(double(C[at]) - want) /
                                  (double(alpha) * mag + std::abs(double(C0[at])) + 1e-30));
    }
  return worst;
}
}  // namespace

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
            const double worst =
                worst_error(C, C0, M, N, K, ldc, alpha, accumulate, [&](int m, int k, int n) {
                  return double(A[std::size_t(m * a_row + k * a_col)]) *
                         double(B[std::size_t(k) * ldb + n]);
                });
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

// tile_gemm_bf16 and its pair packing: against double sums of the bf16-rounded operands (the
// rounding by bf16.hpp's rule, checked in test_onednn_matmul against an independent one), odd K
// (padded pairs), partial row blocks and masked column vectors; the portable form against
// vdpbf16ps bit for bit where the CPU has AVX-512-BF16.
TEST_CASE("tile_gemm_bf16 equals double sums of bf16 operands, packed from any strides",
          "[cpu][tile_gemm]") {
  using moetrain::cpu::from_bf16;
  using moetrain::cpu::to_bf16;
  moetrain::Rng rng(12);
  for (const int M : {1, 5, 6, 13, 64})
    for (const int N : {1, 15, 16, 17, 64, 70, 130})
      for (const int K : {1, 2, 7, 64})
        for (const bool trans : {false, true})  // A and B read transposed from their storage
          for (const bool accumulate : {false, true}) {
            INFO("M " << M << " N " << N << " K " << K << " trans " << trans << " accumulate "
                      << accumulate);
            // a(m, k) at A[m * ar + k * ac], b(k, n) at B[k * br + n * bc]
            const std::ptrdiff_t ar = trans ? 1 : K + 2, ac = trans ? M + 3 : 1;
            const std::ptrdiff_t br = trans ? 1 : N + 1, bc = trans ? K + 5 : 1;
            std::vector<float> A(std::size_t(trans ? K * ac : M * ar)),
                B(std::size_t(trans ? N * bc : K * br)), C(std::size_t(M) * (N + 4));
            for (auto* v : {&A, &B, &C})
              for (float& x : *v) x = float(rng.uniform() - 0.5);
            const int K2 = (K + 1) / 2, ldc = N + 4;
            std::vector<std::uint32_t> Ap(std::size_t(M) * K2), Bp(std::size_t(K2) * N);
            moetrain::cpu::pack_pairs_a(Ap.data(), K2, A.data(), ar, ac, M, K);
            moetrain::cpu::pack_pairs_b(Bp.data(), N, B.data(), br, bc, K, N);
            const std::vector<float> C0 = C;
            const float alpha = 0.75f;
            std::vector<float> portable = C;
            moetrain::cpu::tile_gemm_bf16(M, N, K2, alpha, Ap.data(), K2, Bp.data(), N,
                                          portable.data(), ldc, accumulate, false);
            C = C0;
            moetrain::cpu::tile_gemm_bf16(M, N, K2, alpha, Ap.data(), K2, Bp.data(), N, C.data(),
                                          ldc, accumulate);
            auto rd = [](float x) { return double(from_bf16(to_bf16(x))); };
            const double worst =
                worst_error(C, C0, M, N, K, ldc, alpha, accumulate, [&](int m, int k, int n) {
                  return rd(A[std::size_t(m * ar + k * ac)]) * rd(B[std::size_t(k * br + n * bc)]);
                });
            CHECK(worst < 1e-6);  // fp32 accumulation of exact bf16 products
            CHECK(std::memcmp(C.data(), portable.data(), C.size() * sizeof(float)) == 0);
          }
}

TEST_CASE("tile_gemm_bf16 refuses the hardware form on a CPU without AVX-512-BF16",
          "[cpu][tile_gemm]") {
  std::uint32_t a = 0, b = 0;
  float c = 0;
  if (moetrain::cpu::cpu_has_avx512_bf16())
    CHECK_NOTHROW(moetrain::cpu::tile_gemm_bf16(1, 1, 1, 1.0f, &a, 1, &b, 1, &c, 1, false, true));
  else
    CHECK_THROWS_WITH(
        moetrain::cpu::tile_gemm_bf16(1, 1, 1, 1.0f, &a, 1, &b, 1, &c, 1, false, true),
        Catch::Contains("AVX-512-BF16"));
}
