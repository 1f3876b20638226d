// tests/simt/test_rmsnorm.cpp — kernels/rmsnorm.cu in the SIMT simulator against the CPU backend,
// in fp32, bf16, and bf16 activations with an fp32 gain (whose fp32 gradient must stay within fp32
// rounding of the reference): the fused residual add (in place and out of place) and RMSNorm
// forward (x, y, rstd), and the backward (dx accumulated into a residual gradient, dgain through
// per-block partials), on NaN-poisoned outputs and workspace, under several schedules, with more
// rows than the grid covers, and widths that change the backward's warps per block (including more
// than 48 KiB of partials).
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

#include "kernel_test_util.hpp"
#include "moetrain/cpu_backend.hpp"
#include "rmsnorm.cuh"

namespace {

using namespace kernel_test;

struct Case {
  int n, d;
  int max_blocks;
};

double g_max_err[2] = {0, 0};  // over every output, fp32 / bf16

template <typename T, typename TG = T>
void run_case(const Case& c, unsigned seed) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  const double tol = kF32 ? 1e-5 : 2e-2;
  const double gain_tol = std::is_same_v<TG, float> ? 1e-5 : 2e-2;
  const int n = c.n, d = c.d;
  const float eps = 1e-6f;
  std::mt19937 rng(seed);
  const std::vector<float> r_x = representable<T>(random_floats(size_t(n) * d, rng));
  std::vector<float> gain = random_floats(d, rng);
  for (auto& g : gain) g = 1.0f + 0.2f * g;
  gain = representable<TG>(gain);
  const std::vector<float> dy = representable<T>(random_floats(size_t(n) * d, rng));
  const std::vector<float> dx0 = representable<T>(random_floats(size_t(n) * d, rng));
  const std::vector<float> dgain0 = representable<TG>(random_floats(d, rng));

  moetrain::CpuBackend<float> be;
  std::vector<float> r_y(size_t(n) * d), r_rstd(n);
  be.rmsnorm_forward(r_y.data(), r_rstd.data(), r_x.data(), gain.data(), n, d, eps);
  std::vector<float> r_dx = dx0, r_dgain = dgain0;
  be.rmsnorm_backward(r_dx.data(), r_dgain.data(), dy.data(), r_x.data(), gain.data(),
                      r_rstd.data(), n, d);

  DeviceBuffer<TG> d_gain(to_storage<TG>(gain)), d_dgain(static_cast<size_t>(d));
  DeviceBuffer<T> d_y(size_t(n) * d), d_dx(size_t(n) * d);
  DeviceBuffer<T> d_x(to_storage<T>(r_x)), d_dy(to_storage<T>(dy));
  DeviceBuffer<float> d_rstd(static_cast<size_t>(n)), d_ref_rstd(r_rstd);
  DeviceBuffer<unsigned char> d_ws(mk::rmsnorm_backward_workspace_bytes(n, d, c.max_blocks));
  for (const Schedule& s : test_schedules()) {
    ScopedSchedule scope(s);
    INFO("n " << n << " d " << d << " max_blocks " << c.max_blocks << " "
              << (kF32 ? "fp32" : "bf16") << " gain "
              << (std::is_same_v<TG, float> ? "fp32" : "bf16") << " schedule " << s.name());
    d_y.poison();
    d_rstd.poison();
    d_ws.poison();
    mk::rmsnorm_forward(d_y.ptr, d_rstd.ptr, d_x.ptr, d_gain.ptr, n, d, eps, nullptr, c.max_blocks);
    // The backward on the reference forward's x and rstd, so it is tested on its own.
    d_dx.upload(to_storage<T>(dx0));
    d_dgain.upload(to_storage<TG>(dgain0));
    mk::rmsnorm_backward(d_dx.ptr, d_dgain.ptr, d_dy.ptr, d_x.ptr, d_gain.ptr, d_ref_rstd.ptr, n, d,
                         d_ws.ptr, nullptr, c.max_blocks);

    const auto y = to_float(d_y.download()), dx = to_float(d_dx.download()),
               dgain = to_float(d_dgain.download());
    const auto rstd = d_rstd.download();
    REQUIRE_FALSE(has_nan(y));
    REQUIRE_FALSE(has_nan(rstd));
    REQUIRE_FALSE(has_nan(dx));
    REQUIRE_FALSE(has_nan(dgain));
    const double e_y = rel_error(y, r_y), e_rstd = rel_error(rstd, r_rstd);
    const double e_dx = rel_error(dx, r_dx), e_dgain = rel_error(dgain, r_dgain);
    INFO("errors: y " << e_y << " rstd " << e_rstd << " dx " << e_dx << " dgain " << e_dgain);
    CHECK(e_y <= tol);
    CHECK(e_rstd <= 1e-5);  // fp32 statistics of the same (rounded) x
    CHECK(e_dx <= tol);
    CHECK(e_dgain <= gain_tol);
    double& m = g_max_err[kF32 ? 0 : 1];
    m = std::max({m, e_y, e_rstd, e_dx, e_dgain});
  }
}

}  // namespace

TEST_CASE("rmsnorm kernels: forward and backward match the CPU backend", "[simt][kernels]") {
  g_max_err[0] = g_max_err[1] = 0;
  const Case cases[] = {
      {1, 1, 0},      // tiny
      {37, 100, 0},   // fp32 packs, bf16 scalar
      {50, 264, 2},   // packs in both; 2 blocks walk 50 rows
      {19, 72, 1},    // one block
      {6, 3000, 0},   // 4 warps per backward block
      {3, 12500, 0},  // 1 warp, 50 KiB of partials (shared-memory opt-in)
  };
  unsigned seed = 1;
  for (const Case& c : cases) {
    run_case<float>(c, seed);
    run_case<bf16>(c, seed);
    run_case<bf16, float>(c, seed);
    ++seed;
  }
  if (std::getenv("MOETRAIN_KERNEL_ERRORS"))
    std::printf("rmsnorm kernels: max relative error fp32 %.3g, bf16 %.3g\n", g_max_err[0],
                g_max_err[1]);
}

TEST_CASE("rmsnorm kernels: too wide rows are rejected", "[simt][kernels]") {
  CHECK_THROWS_AS(mk::rmsnorm_backward_workspace_bytes(4, 100000), std::invalid_argument);
}
