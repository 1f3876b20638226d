// The MoE layer's pieces on their own (docs/design.md §3), in double against references written
// out here: the grouped GEMMs over expert offsets (empty and hot experts), the experts against one
// dense SwiGLU per expert, the dispatcher's permute and gate combine, and the router's loads, bias
// update and bias state.
#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

#include "gradcheck.hpp"
#include "model/arena.hpp"
#include "model/moe/dispatcher.hpp"
#include "model/moe/experts.hpp"
#include "model/moe/router.hpp"
#include "moetrain/cpu_backend.hpp"

using namespace moetrain;
using moetrain::test::random_vector;

namespace {

// Skewed loads: an empty first expert, a hot one, an empty one in the middle, a single row.
const std::vector<std::int32_t> kOffsets = {0, 0, 9, 9, 10, 13};
constexpr int kGroups = 5, kRows = 13;

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

}  // namespace

TEST_CASE("grouped_gemm: each group's rows times its own matrix", "[moe]") {
  CpuBackend<double> be;
  const int N = 6, K = 4;
  for (const bool trans_b : {true, false}) {
    INFO("trans_b " << trans_b);
    const auto A = random_vector(std::size_t(kRows) * K, 1);
    const auto B = random_vector(std::size_t(kGroups) * N * K + 3, 2);  // stride N*K + ...
    const std::size_t stride = std::size_t(N) * K;
    auto C = random_vector(std::size_t(kRows) * N, 3);
    std::vector<double> ref(C.size());
    const double alpha = 0.5, beta = -2.0;
    for (int g = 0; g < kGroups; ++g)
      for (int r = kOffsets[std::size_t(g)]; r < kOffsets[std::size_t(g) + 1]; ++r)
        for (int n = 0; n < N; ++n) {
          double s = 0;
          for (int k = 0; k < K; ++k) {
            const double b = trans_b ? B[g * stride + std::size_t(n) * K + k]
                                     : B[g * stride + std::size_t(k) * N + n];
            s += A[std::size_t(r) * K + k] * b;
          }
          ref[std::size_t(r) * N + n] = alpha * s + beta * C[std::size_t(r) * N + n];
        }
    be.grouped_gemm(trans_b, kRows, N, K, alpha, A.data(), K, B.data(), trans_b ? K : N, stride,
                    beta, C.data(), N, kOffsets.data(), kGroups);
    CHECK(max_abs_diff(C, ref) < 1e-12);
  }
  std::vector<double> A(4), B(4), C(4);
  REQUIRE_THROWS_WITH(be.grouped_gemm(true, kRows + 1, 1, 1, 1.0, A.data(), 1, B.data(), 1, 1, 0.0,
                                      C.data(), 1, kOffsets.data(), kGroups),
                      Catch::Contains("offsets end at 13, expected rows = 14"));
}

TEST_CASE("grouped_gemm_wgrad: per-group A^T B accumulated, empty groups untouched", "[moe]") {
  CpuBackend<double> be;
  const int M = 3, N = 5;
  const auto A = random_vector(std::size_t(kRows) * M, 4);
  const auto B = random_vector(std::size_t(kRows) * N, 5);
  const std::size_t stride = std::size_t(M) * N + 2;
  auto C = random_vector(std::size_t(kGroups) * stride, 6);
  std::vector<double> ref = C;
  for (int g = 0; g < kGroups; ++g)
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) {
        double s = 0;
        for (int r = kOffsets[std::size_t(g)]; r < kOffsets[std::size_t(g) + 1]; ++r)
          s += A[std::size_t(r) * M + m] * B[std::size_t(r) * N + n];
        ref[g * stride + std::size_t(m) * N + n] += 0.25 * s;
      }
  be.grouped_gemm_wgrad(kRows, M, N, 0.25, A.data(), M, B.data(), N, C.data(), N, stride,
                        kOffsets.data(), kGroups);
  CHECK(max_abs_diff(C, ref) < 1e-12);
}

TEST_CASE("Experts: one SwiGLU per expert on its rows", "[moe]") {
  CpuBackend<double> be;
  const int d = 4, ff = 3, E = kGroups;
  std::vector<SwiGluOffsets> w(static_cast<std::size_t>(E));
  const std::size_t per = std::size_t(3) * ff * d;  // [2 ff, d] then [d, ff], as the layout does
  for (int e = 0; e < E; ++e) w[std::size_t(e)] = {5 + e * per, 5 + e * per + 2 * ff * d, ff};
  const auto params = random_vector(5 + E * per, 7, 0.5);
  const auto xg = random_vector(std::size_t(kRows) * d, 8);
  Experts<double> experts(be, w, kRows, d);
  ArenaPlan plan;
  experts.plan(plan);
  void* arena = plan.commit(be);
  experts.forward(params.data(), xg.data(), kOffsets.data());
  const double* y_dev = experts.acts().y.as<double>();  // the CPU backend: host memory
  std::vector<double> y(y_dev, y_dev + std::size_t(kRows) * d), ref(y.size());
  for (int e = 0; e < E; ++e)
    for (int r = kOffsets[std::size_t(e)]; r < kOffsets[std::size_t(e) + 1]; ++r) {
      const double* W13 = params.data() + w[std::size_t(e)].w13;
      const double* W2 = params.data() + w[std::size_t(e)].w2;
      std::vector<double> act(static_cast<std::size_t>(ff));
      for (int f = 0; f < ff; ++f) {
        double h1 = 0, h3 = 0;
        for (int k = 0; k < d; ++k) {
          h1 += xg[std::size_t(r) * d + k] * W13[std::size_t(f) * d + k];
          h3 += xg[std::size_t(r) * d + k] * W13[std::size_t(ff + f) * d + k];
        }
        act[std::size_t(f)] = h1 / (1 + std::exp(-h1)) * h3;
      }
      for (int k = 0; k < d; ++k) {
        double s = 0;
        for (int f = 0; f < ff; ++f) s += act[std::size_t(f)] * W2[std::size_t(k) * ff + f];
        ref[std::size_t(r) * d + k] = s;
      }
    }
  CHECK(max_abs_diff(y, ref) < 1e-12);
  be.free_bytes(arena);
  // Experts whose weights are not evenly strided are refused (the grouped GEMM needs a stride).
  w[2].w13 += 1;
  CHECK_THROWS_WITH((Experts<double>(be, w, kRows, d)), Catch::Contains("evenly strided"));
}

TEST_CASE("Dispatcher: tokens grouped by expert and combined with their gates", "[moe]") {
  CpuBackend<double> be;
  const int T = 5, d = 3, E = 4, k = 2;
  const std::vector<std::int32_t> topk = {2, 0, 1, 2, 2, 3, 0, 1, 3, 2};  // token t: 2t, 2t+1
  std::vector<std::int32_t> counts(E, 0);
  for (auto e : topk) ++counts[std::size_t(e)];
  const auto x = random_vector(std::size_t(T) * d, 9);
  const auto gates = random_vector(std::size_t(T) * k, 10);
  Dispatcher<double> disp(be, T, d, E, k);
  ArenaPlan plan;
  disp.plan(plan);
  void* arena = plan.commit(be);
  disp.dispatch(x.data(), topk.data(), counts.data());
  const auto& a = disp.acts();
  // Expert e's rows are contiguous, in token order, and hold that token's x.
  CHECK(std::vector<std::int32_t>(a.offsets, a.offsets + E + 1) ==
        std::vector<std::int32_t>{0, 2, 4, 8, 10});
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j) {
      const int row = a.pos[t * k + j], e = topk[std::size_t(t * k + j)];
      CHECK(row >= a.offsets[e]);
      CHECK(row < a.offsets[e + 1]);
      for (int c = 0; c < d; ++c)
        CHECK(a.xg.as<double>()[std::size_t(row) * d + c] == x[std::size_t(t) * d + c]);
    }
  // With identity experts (yg = xg) the combine adds sum_j gate_j * x[t] to out.
  std::vector<double> out(std::size_t(T) * d, 1.0), tmp(out.size());
  disp.combine(out.data(), a.xg, gates.data(), tmp.data());
  for (int t = 0; t < T; ++t)
    for (int c = 0; c < d; ++c)
      CHECK(out[std::size_t(t) * d + c] ==
            Approx(1.0 + (gates[std::size_t(t) * k] + gates[std::size_t(t) * k + 1]) *
                             x[std::size_t(t) * d + c])
                .epsilon(1e-14));
  // dispatch_backward sums each token's rows: all ones give k per element.
  std::vector<double> dxg(std::size_t(T * k) * d, 1.0), dx(std::size_t(T) * d, 0.0);
  disp.dispatch_backward(dx.data(), dxg.data());
  for (double v : dx) CHECK(v == double(k));
  be.free_bytes(arena);
}

TEST_CASE("Router: the sign-rule bias update, bias state", "[moe]") {
  ModelConfig cfg;
  cfg.d_model = 4;
  cfg.moe.n_experts = 4;
  cfg.moe.router = RouterType::SigmoidBias;
  CpuBackend<double> be;
  Router<double> router(cfg, 0, be);
  CHECK(router.bias_state() == std::vector<double>(4, 0.0));
  const std::vector<std::int64_t> loads = {5, 2, 2, 3};
  // mean 3: experts above it lose rate, below gain it, at it stay.
  router.update_bias(loads, 0.25);
  CHECK(router.bias_state() == std::vector<double>{-0.25, 0.25, 0.25, 0.0});
  router.load_bias_state({1, 2, 3, 4}, "ckpt");
  CHECK(router.bias_state() == std::vector<double>{1, 2, 3, 4});
  CHECK_THROWS_WITH(router.load_bias_state({1, 2}, "ckpt/trainer_state.json"),
                    Catch::Contains("ckpt/trainer_state.json") && Catch::Contains("4 entries"));
  CHECK_THROWS_WITH(router.update_bias({1, 2}, 0.1), Catch::Contains("2 loads, expected 4"));
}
