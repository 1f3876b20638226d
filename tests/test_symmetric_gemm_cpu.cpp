// Newton-Schulz's Gram product on the CPU backend: symmetric_gemm_batched (BLAS syrk, mirrored)
// against a direct sum in double, both orientations, batched, with beta, shift, in place and
// without C. Muon's update itself (wide and tall matrices, the tall ones never transposed) is
// checked against an independent NS5 in test_optimizer.cpp.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <random>
#include <stdexcept>
#include <vector>

#include "moetrain/cpu_backend.hpp"

namespace {

using moetrain::CpuBackend;

std::vector<double> random_matrix(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> dist(0.0, 1.0);
  std::vector<double> v(n);
  for (double& x : v) x = dist(rng);
  return v;
}

}  // namespace

TEST_CASE("symmetric_gemm_batched: alpha op(X) op(X)^T + beta C + shift I, mirrored", "[ops][ns]") {
  CpuBackend<double> be;
  for (const bool trans : {false, true}) {
    for (const int batch : {1, 3}) {
      const int n = 7, k = 5, ldx = trans ? n + 2 : k + 3, ldd = n + 1;
      const std::size_t sx = std::size_t(trans ? k : n) * ldx + 4, sd = std::size_t(n) * ldd + 2;
      const std::vector<double> X = random_matrix(sx * batch, 3 + unsigned(batch));
      std::vector<double> C = random_matrix(sd * batch, 9);
      // C symmetric in its upper triangle; its lower triangle is garbage that must not be read.
      for (int b = 0; b < batch; ++b)
        for (int i = 0; i < n; ++i)
          for (int j = 0; j < i; ++j) C[sd * b + std::size_t(i) * ldd + j] = NAN;
      std::vector<double> D(sd * batch, -7.0);
      const double alpha = 0.75, beta = -1.5, shift = 2.25;
      be.symmetric_gemm_batched(trans, n, k, alpha, X.data(), ldx, sx, beta, C.data(), ldd, sd,
                                shift, D.data(), ldd, sd, batch);
      for (int b = 0; b < batch; ++b)
        for (int i = 0; i < n; ++i) {
          for (int j = 0; j < n; ++j) {
            double dot = 0;
            for (int p = 0; p < k; ++p) {
              const auto at = [&](int r, int c) {  // op(X)[r, c]
                return trans ? X[sx * b + std::size_t(c) * ldx + r]
                             : X[sx * b + std::size_t(r) * ldx + c];
              };
              dot += at(i, p) * at(j, p);
            }
            const double c_ij = C[sd * b + std::size_t(std::min(i, j)) * ldd + std::max(i, j)];
            const double want = alpha * dot + beta * c_ij + (i == j ? shift : 0.0);
            const double got = D[sd * b + std::size_t(i) * ldd + j];
            CHECK(got == Approx(want).epsilon(1e-12).margin(1e-12));
            CHECK(got == D[sd * b + std::size_t(j) * ldd + i]);  // exactly symmetric
          }
          CHECK(D[sd * b + std::size_t(i) * ldd + n] == -7.0);  // the padding column
        }
      // In place (C = D), beta = 0 with no C at all.
      std::vector<double> E = D;
      be.symmetric_gemm_batched(trans, n, k, alpha, X.data(), ldx, sx, 1.0, E.data(), ldd, sd, 0.0,
                                E.data(), ldd, sd, batch);
      std::vector<double> F(sd * batch, -7.0);
      be.symmetric_gemm_batched(trans, n, k, alpha, X.data(), ldx, sx, 0.0, nullptr, ldd, sd, 0.0,
                                F.data(), ldd, sd, batch);
      for (int b = 0; b < batch; ++b)
        for (int i = 0; i < n; ++i)
          for (int j = 0; j < n; ++j) {
            const std::size_t at = sd * b + std::size_t(i) * ldd + j;
            CHECK(E[at] == Approx(D[at] + F[at]).epsilon(1e-12).margin(1e-12));
          }
    }
  }
  std::vector<double> x(4), d(4);
  CHECK_THROWS_AS(be.symmetric_gemm_batched(false, 2, 0, 1.0, x.data(), 2, 4, 0.0, nullptr, 2, 4,
                                            0.0, d.data(), 2, 4, 1),
                  std::invalid_argument);
}
