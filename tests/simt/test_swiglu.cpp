// tests/simt/test_swiglu.cpp — kernels/swiglu.cu in the SIMT simulator against the CPU backend, in
// fp32 and bf16: forward and backward on NaN-poisoned outputs, in-place backward (dh over h),
// widths that take the scalar and the 16-byte-pack paths, several column blocks per row, several
// rows per block, more rows than the grid covers, several schedules.
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
#include "swiglu.cuh"

namespace {

using namespace kernel_test;

struct Case {
  int rows, ff;
  bool in_place;  // backward writes dh over h
  int max_blocks;
};

double g_max_err[2] = {0, 0};

template <typename T>
void run_case(const Case& c, unsigned seed) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  const double tol = kF32 ? 1e-5 : 2e-2;
  std::mt19937 rng(seed);
  std::vector<float> h = random_floats(size_t(c.rows) * 2 * c.ff, rng);
  for (auto& v : h) v *= 3.0f;  // well into both tails of silu
  h = representable<T>(h);
  const std::vector<float> dout = representable<T>(random_floats(size_t(c.rows) * c.ff, rng));

  moetrain::CpuBackend<float> be;
  std::vector<float> r_out(size_t(c.rows) * c.ff), r_dh(size_t(c.rows) * 2 * c.ff);
  be.swiglu_forward(r_out.data(), h.data(), c.rows, c.ff);
  be.swiglu_backward(r_dh.data(), dout.data(), h.data(), c.rows, c.ff);

  DeviceBuffer<T> d_h(h.size()), d_dout(to_storage<T>(dout)), d_out(r_out.size()),
      d_dh(r_dh.size());
  for (const Schedule& s : test_schedules()) {
    ScopedSchedule scope(s);
    INFO("rows " << c.rows << " ff " << c.ff << (c.in_place ? " in place" : "") << " max_blocks "
                 << c.max_blocks << " " << (kF32 ? "fp32" : "bf16") << " schedule " << s.name());
    d_h.upload(to_storage<T>(h));
    d_out.poison();
    d_dh.poison();
    mk::swiglu_forward(d_out.ptr, d_h.ptr, c.rows, c.ff, nullptr, c.max_blocks);
    T* dh = c.in_place ? d_h.ptr : d_dh.ptr;
    mk::swiglu_backward(dh, d_dout.ptr, d_h.ptr, c.rows, c.ff, nullptr, c.max_blocks);
    const auto out = to_float(d_out.download());
    const auto dhv = to_float((c.in_place ? d_h : d_dh).download());
    REQUIRE_FALSE(has_nan(out));
    REQUIRE_FALSE(has_nan(dhv));
    const double e_f = rel_error(out, r_out), e_b = rel_error(dhv, r_dh);
    INFO("errors: forward " << e_f << " backward " << e_b);
    CHECK(e_f <= tol);
    CHECK(e_b <= tol);
    g_max_err[kF32 ? 0 : 1] = std::max({g_max_err[kF32 ? 0 : 1], e_f, e_b});
  }
}

}  // namespace

TEST_CASE("swiglu kernels: forward and backward match the CPU backend", "[simt][kernels]") {
  g_max_err[0] = g_max_err[1] = 0;
  const Case cases[] = {
      {1, 1, false, 0},     // tiny
      {37, 100, true, 0},   // fp32 packs, bf16 scalar; in-place backward; several rows per block
      {300, 72, false, 3},  // packs in both; 3 row blocks walk 300 rows
      {5, 1001, false, 0},  // scalar, 4 column blocks per row
      {11, 2200, true, 2},  // packs, several column blocks (bf16 275 packs, fp32 550)
  };
  unsigned seed = 1;
  for (const Case& c : cases) {
    run_case<float>(c, seed);
    run_case<bf16>(c, seed);
    ++seed;
  }
  if (std::getenv("MOETRAIN_KERNEL_ERRORS"))
    std::printf("swiglu kernels: max relative error fp32 %.3g, bf16 %.3g\n", g_max_err[0],
                g_max_err[1]);
}
