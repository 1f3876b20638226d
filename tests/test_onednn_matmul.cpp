// The float CPU backend's model GEMMs on oneDNN (src/backend/cpu/onednn_matmul.cpp): gemm,
// grouped_gemm and grouped_gemm_wgrad against direct sums in double, in fp32 and with bf16
// operands, over transposes, padded leading dimensions, alpha and beta, odd sizes and empty
// groups. The bf16 reference rounds the operands by its own rule (the nearer of the two bf16
// neighbours, ties to the even one), so the bf16 check is of the rounding and the product both.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "gradcheck.hpp"
#include "moetrain/cpu_backend.hpp"

namespace {

using moetrain::CpuBackend;
using moetrain::CpuBackendOptions;

std::vector<float> random_floats(std::size_t n, unsigned seed) {
  const std::vector<double> v = moetrain::test::random_vector(n, seed);
  return std::vector<float>(v.begin(), v.end());
}

// x rounded to bf16 (8 significant bits): of the two bf16 values around x, the nearer; a tie
// goes to the one whose last kept bit is 0.
double bf16_reference(float x) {
  if (x == 0.0f || !std::isfinite(x)) return x;
  int e;
  std::frexp(double(x), &e);                  // |x| = m 2^e, m in [0.5, 1)
  const double ulp = std::ldexp(1.0, e - 8);  // spacing of 8-bit significands at this binade
  const double lo = std::floor(double(x) / ulp) * ulp, hi = lo + ulp;
  const double dlo = double(x) - lo, dhi = hi - double(x);
  if (dlo < dhi) return lo;
  if (dhi < dlo) return hi;
  return std::fmod(std::abs(lo / ulp), 2.0) == 0.0 ? lo : hi;
}

// C[M,N] = alpha op(A) op(B) + beta C0 in double, the operands optionally rounded to bf16.
std::vector<double> reference(bool ta, bool tb, int M, int N, int K, double alpha,
                              const std::vector<float>& A, int lda, const std::vector<float>& B,
                              int ldb, double beta, const std::vector<float>& C0, int ldc,
                              bool bf16) {
  auto rd = [bf16](float x) { return bf16 ? bf16_reference(x) : double(x); };
  std::vector<double> C(C0.begin(), C0.end());
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      double s = 0;
      for (int k = 0; k < K; ++k)
        s += rd(ta ? A[std::size_t(k) * lda + i] : A[std::size_t(i) * lda + k]) *
             rd(tb ? B[std::size_t(j) * ldb + k] : B[std::size_t(k) * ldb + j]);
      double& c = C[std::size_t(i) * ldc + j];
      c = alpha * s + (beta == 0 ? 0.0 : beta * c);
    }
  return C;
}

// Largest |got - ref| over the M x N block, relative to the largest |ref| there.
double max_rel_error(const std::vector<float>& got, const std::vector<double>& ref, int M, int N,
                     int ldc) {
  double err = 0, scale = 0;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      const std::size_t at = std::size_t(i) * ldc + j;
      if (!std::isfinite(got[at])) return INFINITY;
      err = std::max(err, std::abs(got[at] - ref[at]));
      scale = std::max(scale, std::abs(ref[at]));
    }
  return err / scale;
}

}  // namespace

TEST_CASE("bf16_reference rounds to nearest with ties to even", "[ops][onednn]") {
  // Around 1 the bf16 spacing is 2^-7 = 4/512.
  CHECK(bf16_reference(1.0f) == 1.0);
  CHECK(bf16_reference(1.0f + 1.0f / 512) == 1.0);              // nearer the lower neighbour
  CHECK(bf16_reference(1.0f + 3.0f / 512) == 1.0 + 4.0 / 512);  // nearer the upper neighbour
  CHECK(bf16_reference(1.0f + 2.0f / 512) == 1.0);              // a tie: 1 is the even one
  CHECK(bf16_reference(1.0f + 6.0f / 512) == 1.0 + 8.0 / 512);  // a tie: 1 + 2^-6 is even
  CHECK(bf16_reference(-3.0f - 1.0f / 256) == -3.0);            // spacing 2^-6 in [2, 4)
}

TEST_CASE("float gemm on oneDNN matches double sums, fp32 and bf16 operands", "[ops][onednn]") {
  for (const bool bf16 : {false, true}) {
    CpuBackend<float> be(CpuBackendOptions{bf16});
    for (const bool ta : {false, true})
      for (const bool tb : {false, true})
        for (const auto& [alpha, beta] :
             {std::pair{1.0f, 0.0f}, std::pair{0.5f, 1.0f}, std::pair{-2.0f, 0.25f}}) {
          const int M = 37, N = 29, K = 53;
          const int lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 5, ldc = N + 2;
          const auto A = random_floats(std::size_t(ta ? K : M) * lda, 1);
          const auto B = random_floats(std::size_t(tb ? N : K) * ldb, 2);
          auto C = random_floats(std::size_t(M) * ldc, 3);
          if (beta == 0.0f)  // beta = 0 must overwrite, not scale: NaN must not survive
            for (float& c : C) c = std::numeric_limits<float>::quiet_NaN();
          const auto ref = reference(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bf16);
          const auto C0 = C;
          be.gemm(ta, tb, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, C.data(), ldc);
          INFO("bf16 " << bf16 << " ta " << ta << " tb " << tb << " alpha " << alpha << " beta "
                       << beta);
          CHECK(max_rel_error(C, ref, M, N, ldc) < 1e-5);
          for (int i = 0; i < M; ++i)  // the padding columns of C are not written
            for (int j = N; j < ldc; ++j) {
              const std::size_t at = std::size_t(i) * ldc + j;
              CHECK(std::memcmp(&C[at], &C0[at], sizeof(float)) == 0);
            }
        }
  }
}

TEST_CASE("bf16 gemm differs from fp32 by bf16 rounding only", "[ops][onednn]") {
  // The same product in both modes against the unrounded double sum: fp32 to float rounding,
  // bf16 to its 8-bit operands (relative error about 2^-8 per factor, averaged over K).
  const int M = 64, N = 48, K = 256;
  const auto A = random_floats(std::size_t(M) * K, 4), B = random_floats(std::size_t(N) * K, 5);
  const std::vector<float> zero(std::size_t(M) * N, 0.0f);
  const auto exact = reference(false, true, M, N, K, 1.0, A, K, B, K, 0.0, zero, N, false);
  double err[2];
  for (const bool bf16 : {false, true}) {
    CpuBackend<float> be(CpuBackendOptions{bf16});
    std::vector<float> C(zero.size());
    be.gemm(false, true, M, N, K, 1.0f, A.data(), K, B.data(), K, 0.0f, C.data(), N);
    err[bf16] = max_rel_error(C, exact, M, N, N);
  }
  INFO("fp32 error " << err[0] << ", bf16 error " << err[1]);
  CHECK(err[0] < 1e-5);
  CHECK(err[1] > 1e-4);  // the operands really were rounded
  CHECK(err[1] < 2e-2);
}

TEST_CASE("gemm with an empty sum scales C by beta", "[ops][onednn]") {
  CpuBackend<float> be;
  std::vector<float> C = {1, 2, 3, 4, 5, 6};
  be.gemm(false, false, 2, 3, 0, 1.0f, nullptr, 1, nullptr, 3, 0.5f, C.data(), 3);
  CHECK(C == std::vector<float>{0.5f, 1, 1.5f, 2, 2.5f, 3});
  be.gemm(false, false, 2, 3, 0, 1.0f, nullptr, 1, nullptr, 3, 0.0f, C.data(), 3);
  CHECK(C == std::vector<float>(6, 0.0f));
}

TEST_CASE("grouped GEMMs on oneDNN match per-group double sums, with empty groups",
          "[ops][onednn]") {
  // Expert-like groups of uneven sizes, two of them empty; the rows change between calls as the
  // experts' loads do.
  for (const bool bf16 : {false, true}) {
    CpuBackend<float> be(CpuBackendOptions{bf16});
    for (const std::vector<std::int32_t>& offsets :
         {std::vector<std::int32_t>{0, 7, 7, 30, 31, 45},
          std::vector<std::int32_t>{0, 0, 12, 13, 40, 45}}) {
      const int groups = 5, rows = 45, N = 19, K = 23;
      const auto A = random_floats(std::size_t(rows) * K, 6);
      const auto B = random_floats(std::size_t(groups) * N * K, 7);  // each B_g [N, K]
      auto C = random_floats(std::size_t(rows) * N, 8);
      const auto C0 = C;
      be.grouped_gemm(true, rows, N, K, 1.0f, A.data(), K, B.data(), K, std::size_t(N) * K, 1.0f,
                      C.data(), N, offsets.data(), groups);
      // weight gradients: W_g[K, N] += A_g^T C_g over the group's rows
      auto W = random_floats(std::size_t(groups) * K * N, 9);
      const auto W0 = W;
      be.grouped_gemm_wgrad(rows, K, N, 1.0f, A.data(), K, C0.data(), N, W.data(), N,
                            std::size_t(K) * N, offsets.data(), groups);
      INFO("bf16 " << bf16);
      for (int g = 0; g < groups; ++g) {
        const int r0 = offsets[std::size_t(g)], n = offsets[std::size_t(g) + 1] - r0;
        INFO("group " << g << " of " << n << " rows");
        const std::vector<float> Ag(A.begin() + std::ptrdiff_t(r0) * K, A.end());
        const std::vector<float> Bg(B.begin() + std::ptrdiff_t(g) * N * K, B.end());
        const std::vector<float> Cg0(C0.begin() + std::ptrdiff_t(r0) * N, C0.end());
        const std::vector<float> Cg(C.begin() + std::ptrdiff_t(r0) * N, C.end());
        if (n > 0) {
          const auto ref = reference(false, true, n, N, K, 1.0, Ag, K, Bg, K, 1.0, Cg0, N, bf16);
          CHECK(max_rel_error(Cg, ref, n, N, N) < 1e-5);
        }
        const std::vector<float> Wg0(W0.begin() + std::ptrdiff_t(g) * K * N, W0.end());
        const std::vector<float> Wg(W.begin() + std::ptrdiff_t(g) * K * N, W.end());
        const auto wref = reference(true, false, K, N, n, 1.0, Ag, K, Cg0, N, 1.0, Wg0, N, bf16);
        CHECK(max_rel_error(Wg, wref, K, N, N) < 1e-5);
      }
    }
  }
}

TEST_CASE("grouped GEMMs refuse offsets that do not end at rows", "[ops][onednn]") {
  CpuBackend<float> be;
  const std::vector<std::int32_t> offsets = {0, 3, 5};
  std::vector<float> A(6 * 2, 1.0f), B(2 * 2 * 2, 1.0f), C(6 * 2, 0.0f);
  CHECK_THROWS_WITH(be.grouped_gemm(false, 6, 2, 2, 1.0f, A.data(), 2, B.data(), 2, 4, 0.0f,
                                    C.data(), 2, offsets.data(), 2),
                    "grouped_gemm: offsets end at 5, expected rows = 6");
  CHECK_THROWS_WITH(be.grouped_gemm_wgrad(6, 2, 2, 1.0f, A.data(), 2, C.data(), 2, B.data(), 2, 4,
                                          offsets.data(), 2),
                    "grouped_gemm_wgrad: offsets end at 5, expected rows = 6");
}

TEST_CASE("the double backend refuses bf16 GEMMs", "[ops][onednn]") {
  CHECK_THROWS_WITH(CpuBackend<double>(CpuBackendOptions{true}),
                    Catch::Contains("bf16 GEMMs are for the float backend only"));
}

// In bf16 the products read weight operands from a bf16 copy of the buffer named by set_weights;
// every write through the backend (an op's output, upload, copy, zero) must make the next product
// see the new values.
TEST_CASE("bf16 products read the weights' copy, refreshed after every write through the backend",
          "[ops][onednn]") {
  CpuBackend<float> be(CpuBackendOptions{true});
  const int M = 9, N = 12, K = 20;
  const std::size_t n = std::size_t(N) * K + 7;  // [N, K] and a tail
  auto* W = static_cast<float*>(be.alloc_bytes(n * sizeof(float)));
  auto host = random_floats(n, 10);
  be.upload(W, host.data(), n * sizeof(float));
  be.set_weights(W, n);
  const auto x = random_floats(std::size_t(M) * K, 11);
  const std::vector<float> zero(std::size_t(M) * N, 0.0f);
  auto product = [&] {  // x W^T, W read from the weights
    std::vector<float> C(zero.size());
    be.gemm(false, true, M, N, K, 1.0f, x.data(), K, W, K, 0.0f, C.data(), N);
    return C;
  };
  auto expect = [&](const char* what) {
    INFO(what);
    std::vector<float> w(W, W + std::size_t(N) * K);
    const auto ref = reference(false, true, M, N, K, 1.0, x, K, w, K, 0.0, zero, N, true);
    CHECK(max_rel_error(product(), ref, M, N, N) < 1e-5);
  };
  expect("first use");
  const auto before = product();
  be.scale(W, n, 2.0);  // an op's mutable output
  const auto doubled = product();
  for (std::size_t i = 0; i < before.size(); ++i) CHECK(doubled[i] == 2.0f * before[i]);
  const auto row = random_floats(std::size_t(K), 12);
  be.upload(W + std::size_t(5) * K, row.data(), row.size() * sizeof(float));
  expect("after an upload into row 5");
  be.copy(W, x.data(), std::size_t(K) * sizeof(float));
  expect("after a copy into row 0");
  // The weights as the transposed A operand, at an offset into the buffer: C = W[2:, :]^T-ish.
  {
    std::vector<float> C(std::size_t(K) * 3, 0.0f);
    const auto y = random_floats(std::size_t(4) * 3, 13);
    be.gemm(true, false, K, 3, 4, 1.0f, W + std::size_t(2) * K, K, y.data(), 3, 0.0f, C.data(), 3);
    std::vector<float> w(W + std::size_t(2) * K, W + std::size_t(6) * K);
    const std::vector<float> z(C.size(), 0.0f);
    const auto ref = reference(true, false, K, 3, 4, 1.0, w, K, y, 3, 0.0, z, 3, true);
    CHECK(max_rel_error(C, ref, K, 3, 3) < 1e-5);
  }
  be.zero(W, n * sizeof(float));
  CHECK(product() == zero);
  be.free_bytes(W);
}

// bf16 products keep their packed operands for later products while the source is unchanged (a
// linear layer's dy feeds its dx and its dW product). The reuse must change no bit, and every kind
// of write to a source must make the next product pack it again.
TEST_CASE("bf16 packed operands are reused only while their source is unchanged", "[ops][onednn]") {
  CpuBackend<float> be(CpuBackendOptions{true});
  const int M = 24, N = 20, K = 33;
  auto alloc = [&](std::size_t n, unsigned seed) {
    auto* p = static_cast<float*>(be.alloc_bytes(n * sizeof(float)));
    const auto host = random_floats(n, seed);
    be.upload(p, host.data(), n * sizeof(float));
    return p;
  };
  float* dy = alloc(std::size_t(M) * K, 20);  // [M, K]: A of both products
  float* W = alloc(std::size_t(K) * N, 21);   // [K, N]
  float* x = alloc(std::size_t(M) * N, 22);   // [M, N]
  auto host = [](const float* p, std::size_t n) { return std::vector<float>(p, p + n); };
  // C1 = dy W (dy as A), C2 = dy^T x (dy as the transposed A: the same stored bytes).
  auto first = [&] {
    std::vector<float> C(std::size_t(M) * N);
    be.gemm(false, false, M, N, K, 1.0f, dy, K, W, N, 0.0f, C.data(), N);
    return C;
  };
  auto second = [&] {
    std::vector<float> C(std::size_t(K) * N);
    be.gemm(true, false, K, N, M, 1.0f, dy, K, x, N, 0.0f, C.data(), N);
    return C;
  };
  auto expect_fresh = [&](const char* what) {  // both products against the data now in memory
    INFO(what);
    const auto d = host(dy, std::size_t(M) * K), w = host(W, std::size_t(K) * N),
               xx = host(x, std::size_t(M) * N);
    const std::vector<float> z1(std::size_t(M) * N, 0.0f), z2(std::size_t(K) * N, 0.0f);
    CHECK(max_rel_error(first(),
                        reference(false, false, M, N, K, 1.0, d, K, w, N, 0.0, z1, N, true), M, N,
                        N) < 1e-5);
    CHECK(max_rel_error(second(),
                        reference(true, false, K, N, M, 1.0, d, K, xx, N, 0.0, z2, N, true), K, N,
                        N) < 1e-5);
  };
  expect_fresh("first use");

  // The second product after the first (dy's copy reused) gives the bits of the second alone after
  // a write elsewhere (nothing reused: the op drops every copy).
  first();
  const auto reused = second();
  be.scale(x + std::size_t(M) * N - 1, 1, 1.0);  // an op: drops the copies, changes no value
  const auto fresh = second();
  CHECK(std::memcmp(reused.data(), fresh.data(), reused.size() * sizeof(float)) == 0);

  be.scale(dy, std::size_t(M) * K, 2.0);
  expect_fresh("after an op wrote dy");
  const auto row = random_floats(std::size_t(K), 23);
  be.upload(dy + std::size_t(7) * K, row.data(), row.size() * sizeof(float));
  expect_fresh("after an upload into row 7 of dy");
  be.copy(dy + std::size_t(3) * K, x, std::size_t(K) * sizeof(float));
  expect_fresh("after a copy into row 3 of dy");
  {  // products whose C lies in dy: its first 3 columns, then (an empty sum) rows 5-6
    const auto y = random_floats(std::size_t(N) * 3, 24);
    first();
    be.gemm(false, false, M, 3, N, 1.0f, x, N, y.data(), 3, 0.0f, dy, K);  // x [M, N] y [N, 3]
    expect_fresh("after a product wrote into dy");
    first();
    be.gemm(false, false, 2, K, 0, 1.0f, x, N, y.data(), K, 0.0f, dy + std::size_t(5) * K, K);
    expect_fresh("after an empty-sum product zeroed rows 5-6 of dy");
  }
  be.zero(dy, std::size_t(2) * K * sizeof(float));
  expect_fresh("after rows 0-1 of dy were zeroed");
  for (float* p : {dy, W, x}) be.free_bytes(p);
}

TEST_CASE("batched gemm on oneDNN matches per-matrix double sums, with gaps between matrices",
          "[ops][onednn]") {
  for (const bool bf16 : {false, true}) {
    CpuBackend<float> be(CpuBackendOptions{bf16});
    for (const bool ta : {false, true})
      for (const bool tb : {false, true}) {
        const int M = 13, N = 10, K = 17, batch = 3;
        const int lda = (ta ? M : K) + 1, ldb = (tb ? K : N) + 2, ldc = N + 3;
        const std::size_t sa = std::size_t(ta ? K : M) * lda + 5,
                          sb = std::size_t(tb ? N : K) * ldb + 3, sc = std::size_t(M) * ldc + 4;
        const auto A = random_floats(sa * batch, 14), B = random_floats(sb * batch, 15);
        auto C = random_floats(sc * batch, 16);
        const auto C0 = C;
        be.gemm_batched(ta, tb, M, N, K, 0.75f, A.data(), lda, sa, B.data(), ldb, sb, 0.5f,
                        C.data(), ldc, sc, batch);
        INFO("bf16 " << bf16 << " ta " << ta << " tb " << tb);
        for (int b = 0; b < batch; ++b) {
          auto from = [b](const std::vector<float>& v, std::size_t stride) {
            return std::vector<float>(v.begin() + std::ptrdiff_t(stride) * b, v.end());
          };
          const auto ref = reference(ta, tb, M, N, K, 0.75, from(A, sa), lda, from(B, sb), ldb, 0.5,
                                     from(C0, sc), ldc, bf16);
          CHECK(max_rel_error(from(C, sc), ref, M, N, ldc) < 1e-5);
        }
        // The gaps between C's matrices are not written.
        for (int b = 0; b + 1 < batch; ++b)
          for (std::size_t i = std::size_t(M) * ldc; i < sc; ++i) {
            const std::size_t at = sc * std::size_t(b) + i;
            CHECK(std::memcmp(&C[at], &C0[at], sizeof(float)) == 0);
          }
      }
  }
}

TEST_CASE("float Gram products on oneDNN: alpha X X^T + beta C + shift I, exactly symmetric",
          "[ops][onednn][ns]") {
  for (const bool bf16 : {false, true})
    for (const bool trans : {false, true})
      for (const bool in_place : {false, true}) {
        CpuBackend<float> be(CpuBackendOptions{bf16});
        const int n = 11, k = 19, batch = 3, ldx = (trans ? n : k) + 2, ldd = n + 1;
        const std::size_t sx = std::size_t(trans ? k : n) * ldx + 3, sd = std::size_t(n) * ldd + 2;
        const auto X = random_floats(sx * batch, 17);
        auto C = random_floats(sd * batch, 18);
        for (int b = 0; b < batch; ++b)  // the lower triangle of C must not be read
          for (int i = 0; i < n; ++i)
            for (int j = 0; j < i; ++j)
              C[sd * std::size_t(b) + std::size_t(i) * ldd + j] =
                  std::numeric_limits<float>::quiet_NaN();
        const auto C0 = C;
        std::vector<float> D(C.size(), 0.0f);
        float* out = in_place ? C.data() : D.data();
        be.symmetric_gemm_batched(trans, n, k, 0.5f, X.data(), ldx, sx, 2.0f, C.data(), ldd, sd,
                                  0.25f, out, ldd, sd, batch);
        INFO("bf16 " << bf16 << " trans " << trans << " in place " << in_place);
        for (int b = 0; b < batch; ++b) {
          const std::vector<float> x(X.begin() + std::ptrdiff_t(sx) * b, X.end());
          // op(X) op(X)^T as a general product of op(X) [n, k] and op(X)^T [k, n].
          std::vector<float> c0(std::size_t(n) * ldd);
          for (int i = 0; i < n; ++i)  // C's upper triangle, mirrored
            for (int j = 0; j < n; ++j)
              c0[std::size_t(i) * ldd + j] =
                  C0[sd * std::size_t(b) + std::size_t(std::min(i, j)) * ldd + std::max(i, j)];
          auto ref = reference(trans, !trans, n, n, k, 0.5, x, ldx, x, ldx, 2.0, c0, ldd, bf16);
          for (int i = 0; i < n; ++i) ref[std::size_t(i) * ldd + i] += 0.25;
          const std::vector<float> d(out + sd * std::size_t(b), out + sd * std::size_t(b + 1) - 2);
          CHECK(max_rel_error(d, ref, n, n, ldd) < 1e-5);
          for (int i = 0; i < n; ++i)
            for (int j = 0; j < i; ++j)
              CHECK(std::memcmp(&d[std::size_t(i) * ldd + j], &d[std::size_t(j) * ldd + i],
                                sizeof(float)) == 0);
        }
      }
}
