// tests/simt/test_rope.cpp — kernels/rope.cu in the SIMT simulator against the CPU backend: forward
// and backward (inverse rotation) in place, for x in fp32 with fp32 tables, and x in bf16 with bf16
// or fp32 tables; rows with a leading dimension wider than the rotated heads (the rest must stay as
// it was), odd half dimensions (scalar path), 16-byte packs, more rows than the grid covers,
// several schedules.
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
#include "rope.cuh"

namespace {

using namespace kernel_test;

struct Case {
  int rows, seq, n_heads, head_dim, ld, max_blocks;
};

double g_max_err[3] = {0, 0, 0};  // (fp32, fp32), (bf16, bf16), (bf16, fp32 tables)

template <typename T, typename TC>
void run_case(const Case& c, unsigned seed) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  constexpr int kSlot = kF32 ? 0 : std::is_same_v<TC, float> ? 2 : 1;
  const double tol = kF32 ? 1e-5 : 2e-2;
  const int half = c.head_dim / 2;
  std::mt19937 rng(seed);
  // HF tables: angle = pos * 10000^(-2i/hd).
  std::vector<float> cos_t(size_t(c.seq) * half), sin_t(size_t(c.seq) * half);
  for (int p = 0; p < c.seq; ++p)
    for (int i = 0; i < half; ++i) {
      const double a = p * std::pow(10000.0, -2.0 * i / c.head_dim);
      cos_t[size_t(p) * half + i] = float(std::cos(a));
      sin_t[size_t(p) * half + i] = float(std::sin(a));
    }
  cos_t = representable<TC>(cos_t);
  sin_t = representable<TC>(sin_t);
  const size_t elems = size_t(c.rows) * c.ld;
  const std::vector<float> x = representable<T>(random_floats(elems, rng));
  const std::vector<float> dx = representable<T>(random_floats(elems, rng));

  moetrain::CpuBackend<float> be;
  std::vector<float> r_x = x, r_dx = dx;
  be.rope_forward(r_x.data(), c.ld, c.rows, c.seq, c.n_heads, c.head_dim, cos_t.data(),
                  sin_t.data());
  be.rope_backward(r_dx.data(), c.ld, c.rows, c.seq, c.n_heads, c.head_dim, cos_t.data(),
                   sin_t.data());

  DeviceBuffer<TC> d_cos(to_storage<TC>(cos_t)), d_sin(to_storage<TC>(sin_t));
  DeviceBuffer<T> d_x(elems), d_dx(elems);
  for (const Schedule& s : test_schedules()) {
    ScopedSchedule scope(s);
    INFO("rows " << c.rows << " seq " << c.seq << " heads " << c.n_heads << " hd " << c.head_dim
                 << " ld " << c.ld << " max_blocks " << c.max_blocks << " slot " << kSlot
                 << " schedule " << s.name());
    d_x.upload(to_storage<T>(x));
    d_dx.upload(to_storage<T>(dx));
    mk::rope_forward(d_x.ptr, c.ld, c.rows, c.seq, c.n_heads, c.head_dim, d_cos.ptr, d_sin.ptr,
                     nullptr, c.max_blocks);
    mk::rope_backward(d_dx.ptr, c.ld, c.rows, c.seq, c.n_heads, c.head_dim, d_cos.ptr, d_sin.ptr,
                      nullptr, c.max_blocks);
    const auto ox = to_float(d_x.download()), odx = to_float(d_dx.download());
    REQUIRE_FALSE(has_nan(ox));
    REQUIRE_FALSE(has_nan(odx));
    // Columns past the rotated heads are untouched.
    for (int r = 0; r < c.rows; ++r)
      for (int j = c.n_heads * c.head_dim; j < c.ld; ++j) {
        REQUIRE(ox[size_t(r) * c.ld + j] == x[size_t(r) * c.ld + j]);
        REQUIRE(odx[size_t(r) * c.ld + j] == dx[size_t(r) * c.ld + j]);
      }
    const double e_f = rel_error(ox, r_x), e_b = rel_error(odx, r_dx);
    INFO("errors: forward " << e_f << " backward " << e_b);
    CHECK(e_f <= tol);
    CHECK(e_b <= tol);
    g_max_err[kSlot] = std::max({g_max_err[kSlot], e_f, e_b});
  }
}

void round_trip(unsigned seed) {
  // backward(forward(x)) = x: the rotation is orthogonal (fp32 only: bf16 rounds in between).
  const Case c{23, 7, 2, 12, 24, 0};
  std::mt19937 rng(seed);
  const int half = c.head_dim / 2;
  std::vector<float> cos_t(size_t(c.seq) * half), sin_t(size_t(c.seq) * half);
  for (size_t i = 0; i < cos_t.size(); ++i) {
    const float a = float(i) * 0.37f;
    cos_t[i] = std::cos(a);
    sin_t[i] = std::sin(a);
  }
  const std::vector<float> x = random_floats(size_t(c.rows) * c.ld, rng);
  DeviceBuffer<float> d_x(x), d_cos(cos_t), d_sin(sin_t);
  mk::rope_forward(d_x.ptr, c.ld, c.rows, c.seq, c.n_heads, c.head_dim, d_cos.ptr, d_sin.ptr);
  mk::rope_backward(d_x.ptr, c.ld, c.rows, c.seq, c.n_heads, c.head_dim, d_cos.ptr, d_sin.ptr);
  CHECK(rel_error(d_x.download(), x) <= 1e-6);
}

}  // namespace

TEST_CASE("rope kernels: forward and backward match the CPU backend", "[simt][kernels]") {
  for (auto& e : g_max_err) e = 0;
  const Case cases[] = {
      {1, 1, 1, 2, 2, 0},        // tiny
      {37, 5, 3, 10, 37, 0},     // half 5: scalar; odd leading dimension with 7 extra columns
      {70, 16, 4, 16, 72, 2},    // half 8: packs in fp32 and bf16; 2 row blocks walk 70 rows
      {9, 9, 5, 64, 5 * 64, 0},  // a real head size: several packs per head
      {45, 11, 3, 128, 3 * 128 + 8, 1},  // hd 128, one row block
  };
  unsigned seed = 1;
  for (const Case& c : cases) {
    run_case<float, float>(c, seed);
    run_case<bf16, bf16>(c, seed);
    run_case<bf16, float>(c, seed);
    ++seed;
  }
  round_trip(99);
  if (std::getenv("MOETRAIN_KERNEL_ERRORS"))
    std::printf(
        "rope kernels: max relative error fp32 %.3g, bf16 (bf16 tables) %.3g, bf16 (fp32 tables) "
        "%.3g\n",
        g_max_err[0], g_max_err[1], g_max_err[2]);
}

TEST_CASE("rope kernels: bad shapes are rejected", "[simt][kernels]") {
  DeviceBuffer<float> f(64);
  CHECK_THROWS_AS(mk::rope_forward(f.ptr, 8, 1, 1, 1, 7, f.ptr, f.ptr),
                  std::invalid_argument);  // odd hd
  CHECK_THROWS_AS(mk::rope_forward(f.ptr, 8, 1, 1, 2, 8, f.ptr, f.ptr),
                  std::invalid_argument);  // ld < 16
  CHECK_THROWS_AS(mk::rope_backward(f.ptr, 8, 1, 0, 1, 8, f.ptr, f.ptr),
                  std::invalid_argument);  // seq 0
}
