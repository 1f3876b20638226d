// tests/simt/test_moe_permute.cpp — kernels/moe_permute.cu in the SIMT simulator against the CPU
// backend: pos and offsets exactly (stable in token order), the permuted rows exactly, the
// backward / combine / combine-backward within 1e-5 (fp32) or 2e-2 (bf16), relative L2; no NaN
// in any output; scalar and 16-byte vector paths, skewed and empty experts, many chunks.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "kernel_test_util.hpp"
#include "moe_permute.cuh"
#include "moetrain/cpu_backend.hpp"

namespace {

using namespace kernel_test;

struct Case {
  const char* name;
  int tokens, d, experts, k;
  bool skewed;  // most assignments to a few experts, some experts empty
};

double g_max_err_f32 = 0, g_max_err_bf16 = 0;

template <typename T>
void run_case(const Case& c, unsigned seed) {
  constexpr bool kBf16 = !std::is_same_v<T, float>;
  const double tol = kBf16 ? 2e-2 : 1e-5;
  const int N = c.tokens, d = c.d, E = c.experts, K = c.k, A = N * K;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto randn = [&](size_t n) {
    std::vector<float> v(n);
    for (auto& x : v) x = normal(rng);
    return v;
  };

  // Top-k ids: K distinct experts per token (skewed toward the first few when asked).
  std::vector<int32_t> topk(static_cast<size_t>(A)), counts(E, 0);
  for (int t = 0; t < N; ++t) {
    std::vector<int> pool(E);
    for (int e = 0; e < E; ++e) pool[e] = e;
    for (int j = 0; j < K; ++j) {
      int pick;
      if (c.skewed && E - j > 3 && rng() % 4 != 0) {
        pick = static_cast<int>(rng() % 3);  // among the first 3 remaining
      } else {
        pick = static_cast<int>(rng() % unsigned(E - j));
      }
      topk[size_t(t) * K + j] = pool[pick];
      pool.erase(pool.begin() + pick);
    }
  }
  for (int a = 0; a < A; ++a) ++counts[topk[a]];

  // Inputs, rounded to the storage type first so both sides see the same values.
  const auto x_s = to_storage<T>(randn(size_t(N) * d));
  const auto dxg_s = to_storage<T>(randn(static_cast<size_t>(A) * d));
  const auto dx0_s = to_storage<T>(randn(size_t(N) * d));
  const auto yg_s = to_storage<T>(randn(static_cast<size_t>(A) * d));
  const auto dy_s = to_storage<T>(randn(size_t(N) * d));
  std::vector<float> gates(static_cast<size_t>(A));
  for (auto& g : gates) g = std::uniform_real_distribution<float>(0.05f, 1.0f)(rng);
  const auto x = to_float(x_s), dxg = to_float(dxg_s), dx0 = to_float(dx0_s), yg = to_float(yg_s),
             dy = to_float(dy_s);

  // CPU reference.
  moetrain::CpuBackend<float> be;
  std::vector<float> r_xg(static_cast<size_t>(A) * d), r_dx = dx0, r_y(size_t(N) * d),
                                                       r_dyg(static_cast<size_t>(A) * d),
                                                       r_dgates(static_cast<size_t>(A));
  std::vector<int32_t> r_pos(static_cast<size_t>(A)), r_offsets(E + 1);
  be.moe_permute(r_xg.data(), r_pos.data(), r_offsets.data(), x.data(), topk.data(), counts.data(),
                 N, d, E, K);
  be.moe_permute_backward(r_dx.data(), dxg.data(), r_pos.data(), N, d, K);
  be.moe_unpermute(r_y.data(), yg.data(), gates.data(), r_pos.data(), N, d, K);
  be.moe_unpermute_backward(r_dyg.data(), r_dgates.data(), dy.data(), yg.data(), gates.data(),
                            r_pos.data(), N, d, K);

  DeviceBuffer<T> d_x(x_s), d_dxg(dxg_s), d_dx(dx0_s), d_yg(yg_s), d_dy(dy_s);
  DeviceBuffer<T> d_xg(static_cast<size_t>(A) * d), d_y(size_t(N) * d),
      d_dyg(static_cast<size_t>(A) * d);
  DeviceBuffer<float> d_gates(gates), d_dgates(static_cast<size_t>(A));
  DeviceBuffer<int32_t> d_topk(topk), d_counts(counts), d_pos(static_cast<size_t>(A)),
      d_offsets(E + 1), d_ref_pos(r_pos);
  DeviceBuffer<unsigned char> d_ws(mk::moe_permute_workspace_bytes(N, E, K));

  for (const Schedule& s :
       schedules({Schedule::forward(), Schedule::reverse(), Schedule::random(3)})) {
    ScopedSchedule scope(s);
    INFO("case " << c.name << (kBf16 ? " bf16" : " fp32") << ", schedule " << s.name());
    d_xg.poison();
    d_y.poison();
    d_dyg.poison();
    d_dgates.poison();
    d_pos.poison();
    d_offsets.poison();
    d_ws.poison();
    d_dx.upload(dx0_s);
    mk::moe_permute(d_xg.ptr, d_pos.ptr, d_offsets.ptr, d_x.ptr, d_topk.ptr, d_counts.ptr, N, d, E,
                    K, d_ws.ptr, nullptr);
    // The row kernels run on the reference pos, so each is tested on its own.
    mk::moe_permute_backward(d_dx.ptr, d_dxg.ptr, d_ref_pos.ptr, N, d, K, nullptr);
    mk::moe_unpermute(d_y.ptr, d_yg.ptr, d_gates.ptr, d_ref_pos.ptr, N, d, K, nullptr);
    mk::moe_unpermute_backward(d_dyg.ptr, d_dgates.ptr, d_dy.ptr, d_yg.ptr, d_gates.ptr,
                               d_ref_pos.ptr, N, d, K, nullptr);

    CHECK(d_pos.download() == r_pos);
    CHECK(d_offsets.download() == r_offsets);
    const auto xg = to_float(d_xg.download());
    REQUIRE_FALSE(has_nan(xg));
    CHECK(std::memcmp(xg.data(), r_xg.data(), xg.size() * sizeof(float)) == 0);  // a copy: exact
    const auto dxo = to_float(d_dx.download()), y = to_float(d_y.download()),
               dyg = to_float(d_dyg.download());
    const auto dgates = d_dgates.download();
    REQUIRE_FALSE(has_nan(dxo));
    REQUIRE_FALSE(has_nan(y));
    REQUIRE_FALSE(has_nan(dyg));
    REQUIRE_FALSE(has_nan(dgates));
    const double e_dx = rel_error(dxo, r_dx), e_y = rel_error(y, r_y),
                 e_dyg = rel_error(dyg, r_dyg), e_dgates = rel_error(dgates, r_dgates);
    INFO("errors: dx " << e_dx << " y " << e_y << " dyg " << e_dyg << " dgates " << e_dgates);
    CHECK(e_dx <= tol);
    CHECK(e_y <= tol);
    CHECK(e_dyg <= tol);
    CHECK(e_dgates <= tol);
    double& g = kBf16 ? g_max_err_bf16 : g_max_err_f32;
    g = std::max({g, e_dx, e_y, e_dyg, e_dgates});
  }
}

}  // namespace

TEST_CASE("moe_permute kernels: permute, combine and backward match the CPU backend",
          "[simt][kernels]") {
  g_max_err_f32 = g_max_err_bf16 = 0;
  const Case cases[] = {
      {"scalar rows E=13 k=3", 203, 37, 13, 3, false},
      {"vector rows E=64 k=6", 150, 64, 64, 6, false},
      {"skewed E=24 k=4", 181, 24, 24, 4, true},
      {"one expert", 70, 12, 1, 1, false},
      {"many chunks E=40 k=6", 1501, 8, 40, 6, true},
      {"E=1024 k=8", 211, 16, 1024, 8, false},
  };
  unsigned seed = 7;
  for (const Case& c : cases) {
    run_case<float>(c, seed);
    run_case<__nv_bfloat16>(c, seed + 1000);
    ++seed;
  }
  run_case<__nv_bfloat16>({"bf16 odd d", 97, 33, 9, 2, false}, 99);
  if (std::getenv("MOETRAIN_KERNEL_ERRORS"))
    std::printf("moe_permute kernels: max relative error fp32 %.3g, bf16 %.3g\n", g_max_err_f32,
                g_max_err_bf16);
}

TEST_CASE("moe_permute kernels: bad sizes are rejected", "[simt][kernels]") {
  DeviceBuffer<float> f(64);
  DeviceBuffer<int32_t> i(64);
  CHECK_THROWS_AS(
      mk::moe_permute(f.ptr, i.ptr, i.ptr, f.ptr, i.ptr, i.ptr, 4, 4, 2000, 2, f.ptr, nullptr),
      std::invalid_argument);
  CHECK_THROWS_AS(mk::moe_unpermute(f.ptr, f.ptr, f.ptr, i.ptr, 4, 0, 2, nullptr),
                  std::invalid_argument);
}
