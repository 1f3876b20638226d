// The CPU backend's vectorised exp (src/backend/cpu/vector_exp.hpp): each SIMD level this CPU runs
// gives the scalar reference's bits element for element, all within 2 ulp of exp in double, with
// the documented behaviour at the edges of float's range.
#include <catch2/catch.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include "backend/cpu/vector_exp.hpp"
#include "moetrain/rng.hpp"

using namespace moetrain;
using namespace moetrain::cpu;

namespace {
// Distance in units in the last place between two finite non-negative floats.
std::int64_t ulp_distance(float a, float b) {
  return std::abs(std::int64_t(std::bit_cast<std::int32_t>(a)) -
                  std::int64_t(std::bit_cast<std::int32_t>(b)));
}

std::vector<SimdLevel> levels_here() {
  std::vector<SimdLevel> v;
  for (int l = 0; l <= int(simd_supported()); ++l) v.push_back(SimdLevel(l));
  return v;
}

// Softmax-like arguments (x - max <= 0) and some above, 1,000 + a tail that no vector width
// divides, so every path's scalar tail runs too.
std::vector<float> arguments() {
  Rng rng(77);
  std::vector<float> x(1037);
  for (std::size_t i = 0; i < x.size(); ++i)
    x[i] = float(i % 5 == 0 ? rng.normal() * 30.0 : -std::abs(rng.normal()) * 12.0);
  return x;
}
}  // namespace

TEST_CASE("vector exp: every SIMD level gives the scalar reference's bits", "[ops][simd]") {
  const std::vector<float> x = arguments();
  const float shift = 3.25f;
  std::vector<float> ref = x;
  const double ref_sum = exp_shifted_sum(ref.data(), int(ref.size()), shift, SimdLevel::Scalar);
  INFO("this CPU runs " << simd_name(simd_supported()));
  for (SimdLevel level : levels_here()) {
    INFO("level " << simd_name(level));
    std::vector<float> y = x;
    const double sum = exp_shifted_sum(y.data(), int(y.size()), shift, level);
    std::size_t differ = 0;
    for (std::size_t i = 0; i < y.size(); ++i)
      differ += std::bit_cast<std::uint32_t>(y[i]) != std::bit_cast<std::uint32_t>(ref[i]);
    CHECK(differ == 0);
    double exact = 0;  // the sum's order differs per level: compare with the double sum
    for (float v : y) exact += double(v);
    CHECK(sum == Approx(exact).epsilon(1e-6));
    CHECK(ref_sum == Approx(exact).epsilon(1e-6));
  }
}

TEST_CASE("vector exp is within 2 ulp of exp over float's normal range", "[ops][simd]") {
  std::vector<float> x;
  for (float v = -87.0f; v < 88.0f; v += 0.0137f) x.push_back(v);
  for (SimdLevel level : levels_here()) {
    INFO("level " << simd_name(level));
    std::vector<float> y = x;
    exp_shifted_sum(y.data(), int(y.size()), 0.0f, level);
    std::int64_t worst = 0;
    for (std::size_t i = 0; i < x.size(); ++i)
      worst = std::max(worst, ulp_distance(y[i], float(std::exp(double(x[i])))));
    CHECK(worst <= 2);
  }
}

TEST_CASE("vector exp: zero, underflow, -inf, NaN and saturation", "[ops][simd]") {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (SimdLevel level : levels_here()) {
    INFO("level " << simd_name(level));
    // 20 copies so that the vector loop, not only the scalar tail, sees each value.
    for (float v : {0.0f, -87.5f, -1000.0f, -inf, nan, 89.0f, inf}) {
      INFO("x = " << v);
      std::vector<float> y(20, v);
      exp_shifted_sum(y.data(), int(y.size()), 0.0f, level);
      if (v == 0.0f) CHECK(y[0] == 1.0f);
      if (v < -87.34f) CHECK(y[0] == 0.0f);  // -87.5, -1000, -inf: below the normal range
      if (std::isnan(v)) CHECK(std::isnan(y[0]));
      if (v > 88.4f) CHECK(y[0] == Approx(std::exp(double(88.3762626647949f))).epsilon(1e-6));
      for (float e : y)
        CHECK(std::bit_cast<std::uint32_t>(e) == std::bit_cast<std::uint32_t>(y[0]));
    }
  }
}

TEST_CASE("vector exp refuses a SIMD level the CPU does not run", "[ops][simd]") {
  float x = 0.0f;
  const SimdLevel beyond = SimdLevel(int(SimdLevel::Avx512) + 1);
  CHECK_THROWS_AS(exp_shifted_sum(&x, 1, 0.0f, beyond), std::invalid_argument);
  CHECK_NOTHROW(require_simd(simd_supported()));
}
