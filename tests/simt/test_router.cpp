// tests/simt/test_router.cpp — kernels/router.cu in the SIMT simulator against the CPU backend:
// scores, gates, statistics and dlogits within 1e-5 (relative L2), top-k ids and counts exactly,
// ties broken toward the lower expert index, no NaN in any output (cudaMalloc poisons with NaN),
// deterministic statistics (the same bits under every schedule).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernel_test_util.hpp"
#include "moetrain/cpu_backend.hpp"
#include "router.cuh"

namespace {

using namespace kernel_test;

// Not the standard schedules: forward, reverse and one random order.
std::vector<Schedule> router_schedules() {
  return schedules({Schedule::forward(), Schedule::reverse(), Schedule::random(11)});
}

struct Case {
  const char* name;
  int tokens, experts, k;
  bool sigmoid;
  double route_scale;
  bool ties;            // logits from a few levels (many exactly equal scores); zero bias
  float offset = 0.0f;  // added to every logit: -150 makes every sigmoid score underflow to 0
};

double g_max_err = 0;  // reported by the last test case

void run_case(const Case& c, unsigned seed) {
  const int N = c.tokens, E = c.experts, K = c.k;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.5f);
  std::vector<float> logits(size_t(N) * E), bias(E), dgates(size_t(N) * K);
  const float levels[] = {-1.0f, 0.0f, 0.25f, 1.0f};
  for (auto& x : logits) x = (c.ties ? levels[rng() % 4] : normal(rng)) + c.offset;
  for (auto& b : bias) b = c.ties ? 0.0f : 0.1f * normal(rng);
  for (auto& x : dgates) x = normal(rng);
  if (c.ties) {
    for (int e = 0; e < E; ++e) logits[e] = 0.5f;  // token 0: every expert tied
    if (N > 1)
      for (int e = 0; e < E; ++e)
        logits[size_t(E) + e] = (e % 3 == 0) ? 2.0f : -2.0f;  // token 1: ties at the top
  }

  // CPU reference.
  moetrain::CpuBackend<float> be;
  const moetrain::RouterShape shape{
      N, E, K, c.sigmoid ? moetrain::RouterType::SigmoidBias : moetrain::RouterType::SoftmaxTopK,
      c.route_scale};
  std::vector<float> r_scores(size_t(N) * E), r_gates(size_t(N) * K), r_stats(3),
      r_dlogits(size_t(N) * E);
  std::vector<int32_t> r_topk(size_t(N) * K), r_counts(E);
  be.router_forward(r_scores.data(), r_topk.data(), r_gates.data(), r_counts.data(), r_stats.data(),
                    logits.data(), c.sigmoid ? bias.data() : nullptr, shape);
  const double aux_coef = 0.01, z_coef = 1e-3, grad_scale = 0.37;
  be.router_backward(r_dlogits.data(), dgates.data(), logits.data(), r_scores.data(), r_topk.data(),
                     r_gates.data(), r_counts.data(), shape, aux_coef, z_coef, grad_scale);
  if (c.ties) {
    // Token 0 (all equal): experts 0..K-1 in order.
    for (int j = 0; j < K; ++j) REQUIRE(r_topk[j] == j);
  }

  const mk::RouterDims dims{N, E, K, c.sigmoid, c.route_scale};
  DeviceBuffer<float> d_logits(logits), d_bias(bias), d_dgates(dgates);
  DeviceBuffer<float> d_scores(size_t(N) * E), d_gates(size_t(N) * K), d_stats(3),
      d_dlogits(size_t(N) * E);
  DeviceBuffer<int32_t> d_topk(size_t(N) * K), d_counts(E);
  DeviceBuffer<float> d_ref_scores(r_scores), d_ref_gates(r_gates);
  DeviceBuffer<int32_t> d_ref_topk(r_topk), d_ref_counts(r_counts);
  DeviceBuffer<unsigned char> d_ws(mk::router_forward_workspace_bytes(N, E));

  std::vector<float> first_stats;
  for (const Schedule& s : router_schedules()) {
    ScopedSchedule scope(s);
    INFO("case " << c.name << ", schedule " << s.name());
    for (auto* b : {&d_scores, &d_gates, &d_stats, &d_dlogits}) b->poison();
    d_topk.poison();
    d_counts.poison();
    d_ws.poison();
    mk::router_forward(d_scores.ptr, d_topk.ptr, d_gates.ptr, d_counts.ptr, d_stats.ptr,
                       d_logits.ptr, c.sigmoid ? d_bias.ptr : nullptr, dims, d_ws.ptr, nullptr);
    // Backward on the reference forward outputs, so it is tested on its own.
    mk::router_backward(d_dlogits.ptr, d_dgates.ptr, d_logits.ptr, d_ref_scores.ptr, d_ref_topk.ptr,
                        d_ref_gates.ptr, d_ref_counts.ptr, dims, aux_coef, z_coef, grad_scale,
                        nullptr);

    const auto scores = d_scores.download(), gates = d_gates.download(), stats = d_stats.download(),
               dlogits = d_dlogits.download();
    const auto topk = d_topk.download();
    const auto counts = d_counts.download();
    REQUIRE_FALSE(has_nan(scores));
    REQUIRE_FALSE(has_nan(gates));
    REQUIRE_FALSE(has_nan(stats));
    REQUIRE_FALSE(has_nan(dlogits));
    CHECK(topk == r_topk);
    CHECK(counts == r_counts);
    const double e_scores = rel_error(scores, r_scores), e_gates = rel_error(gates, r_gates);
    const double e_dlogits = rel_error(dlogits, r_dlogits);
    double e_stats = 0;
    for (int i = 0; i < 3; ++i)
      e_stats = std::max(e_stats, std::fabs(double(stats[i]) - r_stats[i]) /
                                      std::max(1e-30, std::fabs(double(r_stats[i]))));
    INFO("errors: scores " << e_scores << " gates " << e_gates << " stats " << e_stats
                           << " dlogits " << e_dlogits);
    CHECK(e_scores <= 1e-5);
    CHECK(e_gates <= 1e-5);
    CHECK(e_stats <= 1e-5);
    CHECK(e_dlogits <= 1e-5);
    g_max_err = std::max({g_max_err, e_scores, e_gates, e_stats, e_dlogits});
    if (first_stats.empty()) {
      first_stats = stats;
    } else {
      CHECK(std::memcmp(first_stats.data(), stats.data(), 3 * sizeof(float)) ==
            0);  // deterministic
    }
  }
}

}  // namespace

TEST_CASE("router kernels: forward and backward match the CPU backend", "[simt][kernels]") {
  g_max_err = 0;
  const Case cases[] = {
      {"softmax E=37 k=3", 301, 37, 3, false, 1.0, false},
      {"sigmoid_bias E=64 k=6", 263, 64, 6, true, 2.5, false},
      {"softmax E=5 k=5", 67, 5, 5, false, 1.0, false},
      {"sigmoid_bias E=70 k=1", 45, 70, 1, true, 1.0, false},
      {"softmax ties E=40 k=4", 97, 40, 4, false, 1.0, true},
      {"sigmoid_bias ties E=33 k=7", 88, 33, 7, true, 1.5, true},
      {"softmax E=1000 k=8 (more than 48 KiB of shared memory)", 41, 1000, 8, false, 1.0, false},
      {"sigmoid_bias E=1 k=1", 19, 1, 1, true, 1.0, false},
      {"sigmoid_bias E=48 k=4, scores underflow (logits about -150)", 37, 48, 4, true, 2.0, false,
       -150.0f},
  };
  unsigned seed = 100;
  for (const Case& c : cases) run_case(c, seed++);
  if (std::getenv("MOETRAIN_KERNEL_ERRORS"))
    std::printf("router kernels: max relative error %.3g\n", g_max_err);
}

TEST_CASE("router kernels: bad sizes are rejected", "[simt][kernels]") {
  DeviceBuffer<float> f(64);
  DeviceBuffer<int32_t> i(64);
  const mk::RouterDims bad{4, 8, 9, false, 1.0};  // k > E
  CHECK_THROWS_AS(
      mk::router_forward(f.ptr, i.ptr, f.ptr, i.ptr, f.ptr, f.ptr, nullptr, bad, f.ptr, nullptr),
      std::invalid_argument);
  const mk::RouterDims too_many{4, 2000, 2, false, 1.0};
  CHECK_THROWS_AS(mk::router_backward(f.ptr, f.ptr, f.ptr, f.ptr, i.ptr, f.ptr, i.ptr, too_many, 0,
                                      0, 1, nullptr),
                  std::invalid_argument);
}
