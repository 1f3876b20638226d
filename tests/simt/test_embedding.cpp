// tests/simt/test_embedding.cpp — kernels/embedding.cu in the SIMT simulator against the CPU
// backend, in fp32 and bf16: the lookup exactly (a copy), the backward within tolerance (fp32:
// bit-for-bit, the same summation order as the CPU), on NaN-poisoned outputs and workspace, under
// several schedules, with repeated tokens, negative (padding) tokens, more rows than the grid
// covers, and sort sizes that need the global bitonic steps (more than 2048 tokens).
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

#include "embedding.cuh"
#include "kernel_test_util.hpp"
#include "moetrain/cpu_backend.hpp"

namespace {

using namespace kernel_test;

struct Case {
  int n, d, vocab;
  int negatives;   // tokens set to -1 (padding)
  int max_blocks;  // grid cap (0: the kernels' default)
};

double g_max_err[2] = {0, 0};  // backward, fp32 / bf16

// T: the activations (out, dout); TW: the table and its gradient.
template <typename T, typename TW = T>
void run_case(const Case& c, unsigned seed) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  constexpr bool kF32Table = std::is_same_v<TW, float>;
  const double tol = kF32Table ? 1e-5 : 2e-2;
  const int n = c.n, d = c.d, V = c.vocab;
  std::mt19937 rng(seed);
  std::vector<int32_t> tokens(n);
  for (auto& t : tokens) t = int32_t(rng() % uint32_t(V));
  for (int k = 0; k < c.negatives; ++k) tokens[rng() % uint32_t(n)] = -1;
  const std::vector<float> table = representable<TW>(random_floats(size_t(V) * d, rng));
  const std::vector<float> dout = representable<T>(random_floats(size_t(n) * d, rng));
  const std::vector<float> dtable0 = representable<TW>(random_floats(size_t(V) * d, rng));

  // CPU reference; padding tokens give zero rows and no gradient.
  moetrain::CpuBackend<float> be;
  std::vector<float> r_out(size_t(n) * d), r_dtable = dtable0;
  std::vector<int32_t> valid_tokens;
  std::vector<float> valid_dout;
  std::vector<int32_t> lookup = tokens;
  for (auto& t : lookup) t = std::max(t, 0);
  be.embedding_forward(r_out.data(), lookup.data(), table.data(), n, d);
  for (int i = 0; i < n; ++i) {
    if (tokens[i] >= 0) continue;
    std::fill_n(r_out.begin() + ptrdiff_t(i) * d, d, 0.0f);
  }
  for (int i = 0; i < n; ++i) {
    if (tokens[i] < 0) continue;
    valid_tokens.push_back(tokens[i]);
    valid_dout.insert(valid_dout.end(), dout.begin() + ptrdiff_t(i) * d,
                      dout.begin() + ptrdiff_t(i + 1) * d);
  }
  be.embedding_backward(r_dtable.data(), valid_dout.data(), valid_tokens.data(),
                        int(valid_tokens.size()), d);

  DeviceBuffer<int32_t> d_tokens(tokens);
  DeviceBuffer<TW> d_table(to_storage<TW>(table)), d_dtable(size_t(V) * d);
  DeviceBuffer<T> d_dout(to_storage<T>(dout)), d_out(size_t(n) * d);
  DeviceBuffer<unsigned char> d_ws(mk::embedding_backward_workspace_bytes(n));
  for (const Schedule& s : test_schedules()) {
    ScopedSchedule scope(s);
    INFO("n " << n << " d " << d << " vocab " << V << " max_blocks " << c.max_blocks << " "
              << (kF32 ? "fp32" : "bf16") << " table " << (kF32Table ? "fp32" : "bf16")
              << " schedule " << s.name());
    d_out.poison();
    d_ws.poison();
    d_dtable.upload(to_storage<TW>(dtable0));
    mk::embedding_forward(d_out.ptr, d_tokens.ptr, d_table.ptr, n, d, nullptr, c.max_blocks);
    mk::embedding_backward(d_dtable.ptr, d_dout.ptr, d_tokens.ptr, n, d, d_ws.ptr, nullptr,
                           c.max_blocks);
    const auto out = to_float(d_out.download()), dtable = to_float(d_dtable.download());
    REQUIRE_FALSE(has_nan(out));
    REQUIRE_FALSE(has_nan(dtable));
    CHECK(out == representable<T>(r_out));  // a copy (rounded to nearest into bf16): exact
    const double err = rel_error(dtable, r_dtable);
    INFO("backward relative error " << err);
    CHECK(err <= tol);
    // fp32 gradients: the CPU's summation order, bit for bit (bf16 dout values are exact in fp32).
    if constexpr (kF32Table) CHECK(dtable == r_dtable);
    g_max_err[kF32Table ? 0 : 1] = std::max(g_max_err[kF32 ? 0 : 1], err);
  }
}

}  // namespace

TEST_CASE("embedding kernels: forward and backward match the CPU backend", "[simt][kernels]") {
  g_max_err[0] = g_max_err[1] = 0;
  const Case cases[] = {
      {1, 1, 1, 0, 0},        // tiny
      {77, 100, 13, 3, 0},    // fp32 packs, bf16 scalar; many repeats; padding tokens
      {300, 264, 50, 0, 3},   // packs in both; 3 blocks of 8 warps walk 300 rows
      {2500, 24, 40, 5, 0},   // 4096 sort keys: global bitonic steps beyond one 2048-key tile
      {2049, 9, 2049, 0, 2},  // mostly distinct tokens; scalar; grid-capped sort and segments
  };
  unsigned seed = 1;
  for (const Case& c : cases) {
    run_case<float>(c, seed);
    run_case<bf16>(c, seed);
    run_case<bf16, float>(c, seed);
    ++seed;
  }
  if (std::getenv("MOETRAIN_KERNEL_ERRORS"))
    std::printf("embedding kernels: max backward relative error fp32 %.3g, bf16 %.3g\n",
                g_max_err[0], g_max_err[1]);
}

TEST_CASE("embedding kernels: empty input is a no-op", "[simt][kernels]") {
  CHECK(mk::embedding_backward_workspace_bytes(0) == 0);
  mk::embedding_forward<float, float>(nullptr, nullptr, nullptr, 0, 16);
  mk::embedding_backward<float, float>(nullptr, nullptr, nullptr, 0, 16, nullptr);
}
