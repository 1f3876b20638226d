// tests/simt/test_cross_entropy.cpp — kernels/cross_entropy.cu in the SIMT simulator against the
// CPU backend, with fp32 and bf16 logits: per-token losses (fp32) and dlogits written over the
// logits, padding targets (loss 0, zero row), grad_scale 0 (logits untouched), logits far from 0
// (the max subtraction matters), vocab sizes that take the scalar and the 16-byte-pack paths, more
// rows than the grid covers, several schedules, NaN-poisoned losses.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "cross_entropy.cuh"
#include "kernel_test_util.hpp"
#include "moetrain/cpu_backend.hpp"

namespace {

using namespace kernel_test;

struct Case {
  int n, vocab;
  float grad_scale;
  int padding;  // rows with target -1
  float offset, spread;
  int max_blocks;
};

double g_max_err[2][2] = {{0, 0}, {0, 0}};  // [fp32/bf16][losses/dlogits]

template <typename T>
void run_case(const Case& c, unsigned seed) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  const double tol = kF32 ? 1e-5 : 2e-2;
  std::mt19937 rng(seed);
  std::vector<float> logits = random_floats(size_t(c.n) * c.vocab, rng);
  for (auto& v : logits) v = c.offset + c.spread * v;
  logits = representable<T>(logits);
  std::vector<int32_t> targets(c.n);
  for (auto& t : targets) t = int32_t(rng() % uint32_t(c.vocab));
  for (int k = 0; k < c.padding; ++k) targets[rng() % uint32_t(c.n)] = -1;
  if (c.n > 1) targets[1] = c.vocab - 1;  // the last column (the scalar tail of a pack layout)

  moetrain::CpuBackend<float> be;
  std::vector<float> r_losses(c.n), r_dlogits = logits;
  // grad_scale 0 stands for "losses only" (a null scale pointer).
  const float* host_scale = c.grad_scale != 0.0f ? &c.grad_scale : nullptr;
  be.cross_entropy(r_losses.data(), nullptr, r_dlogits.data(), targets.data(), c.n, c.vocab,
                   host_scale);
  DeviceBuffer<float> d_scale(std::vector<float>{c.grad_scale});
  const float* scale = host_scale ? d_scale.ptr : nullptr;

  DeviceBuffer<T> d_logits(logits.size());
  DeviceBuffer<int32_t> d_targets(targets);
  DeviceBuffer<float> d_losses(size_t(c.n));
  for (const Schedule& s : test_schedules()) {
    ScopedSchedule scope(s);
    INFO("n " << c.n << " vocab " << c.vocab << " grad_scale " << c.grad_scale << " max_blocks "
              << c.max_blocks << " " << (kF32 ? "fp32" : "bf16") << " schedule " << s.name());
    d_logits.upload(to_storage<T>(logits));
    d_losses.poison();
    mk::cross_entropy(d_losses.ptr, d_logits.ptr, d_targets.ptr, c.n, c.vocab, scale, nullptr,
                      c.max_blocks);
    const auto losses = d_losses.download();
    const auto dlogits = to_float(d_logits.download());
    REQUIRE_FALSE(has_nan(losses));
    REQUIRE_FALSE(has_nan(dlogits));
    for (int i = 0; i < c.n; ++i) {
      if (targets[i] >= 0) continue;
      REQUIRE(losses[i] == 0.0f);
      if (c.grad_scale != 0.0f)
        for (int v = 0; v < c.vocab; ++v) REQUIRE(dlogits[size_t(i) * c.vocab + v] == 0.0f);
    }
    if (c.grad_scale == 0.0f) CHECK(dlogits == logits);  // no gradient asked: untouched
    // Losses are fp32 outputs computed from the same (rounded) logits: fp32 tolerance in both
    // builds.
    const double e_l = rel_error(losses, r_losses), e_g = rel_error(dlogits, r_dlogits);
    INFO("errors: losses " << e_l << " dlogits " << e_g);
    CHECK(e_l <= 1e-5);
    CHECK(e_g <= tol);
    double* m = g_max_err[kF32 ? 0 : 1];
    m[0] = std::max(m[0], e_l);
    if (c.grad_scale != 0.0f) m[1] = std::max(m[1], e_g);
  }
}

}  // namespace

TEST_CASE("cross_entropy kernel: losses and dlogits match the CPU backend", "[simt][kernels]") {
  for (auto& row : g_max_err) row[0] = row[1] = 0;
  const Case cases[] = {
      {1, 1, 1.0f, 0, 0.0f, 1.0f, 0},            // tiny: loss 0, gradient 0
      {7, 999, 0.37f, 2, 20.0f, 3.0f, 0},        // scalar path; padding; large offset
      {40, 1000, 1.0f / 40, 3, -5.0f, 2.0f, 3},  // packs in both; 3 blocks walk 40 rows
      {3, 5000, 0.5f, 0, 0.0f, 4.0f, 0},         // wide rows: many packs per thread
      {9, 777, 0.0f, 1, 1.0f, 1.0f, 2},          // losses only
  };
  unsigned seed = 1;
  for (const Case& c : cases) {
    run_case<float>(c, seed);
    run_case<bf16>(c, seed);
    ++seed;
  }
  if (std::getenv("MOETRAIN_KERNEL_ERRORS"))
    std::printf(
        "cross_entropy kernel: max relative error losses fp32 %.3g bf16 %.3g, dlogits fp32 %.3g "
        "bf16 %.3g\n",
        g_max_err[0][0], g_max_err[1][0], g_max_err[0][1], g_max_err[1][1]);
}

TEST_CASE("cross_entropy kernel: an out-of-range target gives NaN, not a wild read",
          "[simt][kernels]") {
  const int vocab = 40;
  DeviceBuffer<float> logits(std::vector<float>(2 * vocab, 0.5f)), losses(2);
  DeviceBuffer<int32_t> targets(std::vector<int32_t>{3, vocab});
  DeviceBuffer<float> scale(std::vector<float>{1.0f});
  mk::cross_entropy(losses.ptr, logits.ptr, targets.ptr, 2, vocab, scale.ptr);
  const auto l = losses.download();
  const auto g = logits.download();
  CHECK(l[0] == Approx(std::log(double(vocab))));
  CHECK(std::isnan(l[1]));
  CHECK(std::all_of(g.begin() + vocab, g.end(), [](float v) { return std::isnan(v); }));
}
