// tests/simt/test_elementwise.cpp — kernels/elementwise.cu in the SIMT simulator, fp32 and bf16:
// add / add_inplace / scale / axpby against the CPU backend (with out
// aliasing an input, sizes that leave part of a pack or of a block, pointers offset by one element
// so only the scalar path applies, NaN-poisoned outputs); the bf16 conversions bit for bit against
// the definitions in common.cuh (round-to-nearest-even ties, strided rows whose padding stays
// untouched, stochastic rounding deterministic per seed, different between seeds, unbiased); empty
// sizes.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include "elementwise.cuh"
#include "kernel_test_util.hpp"
#include "moetrain/cpu_backend.hpp"

namespace {

using namespace kernel_test;

double g_max_err[2] = {0, 0};

template <typename T>
void put(T* dst, const std::vector<T>& v) {
  MOETRAIN_CUDA_CHECK(cudaMemcpy(dst, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
}
template <typename T>
std::vector<T> get(const T* src, size_t n) {
  std::vector<T> v(n);
  MOETRAIN_CUDA_CHECK(cudaMemcpy(v.data(), src, n * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

template <typename T>
void expect_close(const std::vector<T>& out_s, const std::vector<float>& ref, const char* what) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  const std::vector<float> out = to_float(out_s);
  REQUIRE_FALSE(has_nan(out));
  const double e = rel_error(out, ref);
  INFO(what << ": relative error " << e);
  CHECK(e <= (kF32 ? 1e-5 : 2e-2));
  g_max_err[kF32 ? 0 : 1] = std::max(g_max_err[kF32 ? 0 : 1], e);
}

// `offset` elements before every operand: offset 1 misaligns all of them (the scalar path).
template <typename T>
void run_linear(size_t n, size_t offset, unsigned seed) {
  std::mt19937 rng(seed);
  const std::vector<float> a = representable<T>(random_floats(n, rng));
  const std::vector<float> b = representable<T>(random_floats(n, rng));
  const float s = 0.7f, alpha = -1.3f, beta = 0.6f;

  moetrain::CpuBackend<float> be;
  std::vector<float> r_add = a, r_scale = a, r_axpby = b;
  be.add_inplace(r_add.data(), b.data(), n);
  be.scale(r_scale.data(), n, s);
  be.axpby(r_axpby.data(), a.data(), n, alpha, beta);

  DeviceBuffer<T> d_a(n + offset), d_b(n + offset);
  T *pa = d_a.ptr + offset, *pb = d_b.ptr + offset;
  const std::vector<T> a_s = to_storage<T>(a), b_s = to_storage<T>(b);
  for (const Schedule& sch : test_schedules()) {
    ScopedSchedule scope(sch);
    INFO("n " << n << " offset " << offset << " " << (std::is_same_v<T, float> ? "fp32" : "bf16")
              << " schedule " << sch.name());
    put(pa, a_s);
    put(pb, b_s);
    mk::add_inplace(pa, pb, n, nullptr);
    expect_close(get(pa, n), r_add, "add_inplace");
    put(pa, a_s);
    mk::scale(pa, n, s, nullptr);
    expect_close(get(pa, n), r_scale, "scale");
    put(pa, a_s);
    mk::axpby(pb, pa, n, alpha, beta, nullptr);
    expect_close(get(pb, n), r_axpby, "axpby");
  }
}

uint16_t rne_bits(float x) {  // round to nearest even, for finite x
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Random values, a third of them exactly halfway between two bf16 values, and special values.
std::vector<float> conversion_inputs(size_t n, std::mt19937& rng) {
  std::vector<float> v = random_floats(n, rng);
  for (size_t i = 0; i < n; ++i) {
    if (i % 3 == 0) {
      uint32_t u;
      std::memcpy(&u, &v[i], sizeof u);
      v[i] = from_bits((u & 0xffff0000u) | 0x8000u);
    }
  }
  const float special[] = {0.0f,
                           -0.0f,
                           1.0f + std::ldexp(1.0f, -8),      // tie, rounds down to the even 1
                           1.0f + 3 * std::ldexp(1.0f, -8),  // tie, rounds up to the even 1 + 2^-6
                           std::numeric_limits<float>::infinity(),
                           -std::numeric_limits<float>::infinity(),
                           std::numeric_limits<float>::max(),  // rounds to inf
                           std::numeric_limits<float>::denorm_min(),
                           -1e-40f};
  for (size_t k = 0; k < std::size(special) && k < n; ++k) v[(k * 7919) % n] = special[k];
  return v;
}

struct Strided {
  int rows, cols, ld_in, ld_out;
};

void run_convert_strided(const Strided& c, unsigned seed) {
  std::mt19937 rng(seed);
  const std::vector<float> in = conversion_inputs(size_t(c.rows) * c.ld_in, rng);
  DeviceBuffer<float> d_in(in);
  DeviceBuffer<bf16> d_out(size_t(c.rows) * c.ld_out);
  for (const Schedule& sch : test_schedules()) {
    ScopedSchedule scope(sch);
    INFO("convert_to_bf16 rows " << c.rows << " cols " << c.cols << " ld_in " << c.ld_in
                                 << " ld_out " << c.ld_out << " schedule " << sch.name());
    d_out.poison();
    mk::convert_to_bf16(d_out.ptr, c.ld_out, d_in.ptr, c.ld_in, c.rows, c.cols, nullptr);
    const std::vector<bf16> out = d_out.download();
    size_t wrong = 0, wrong_rne = 0, pad_touched = 0;
    std::vector<float> got, ref;
    for (int r = 0; r < c.rows; ++r) {
      for (int col = 0; col < c.ld_out; ++col) {
        const uint16_t o = mk::bf16_bits(out[size_t(r) * c.ld_out + col]);
        if (col >= c.cols) {
          pad_touched += o != 0xffffu;
          continue;
        }
        const float x = in[size_t(r) * c.ld_in + col];
        wrong += o != mk::bf16_bits(mk::float_to_bf16(x));
        wrong_rne += o != rne_bits(x);
        if (std::isfinite(x) && x != std::numeric_limits<float>::max()) {
          got.push_back(mk::bf16_to_float(out[size_t(r) * c.ld_out + col]));
          ref.push_back(x);
        }
      }
    }
    CHECK(wrong == 0);
    CHECK(wrong_rne == 0);
    CHECK(pad_touched == 0);
    CHECK(rel_error(got, ref) <= 2e-2);
  }
}

void run_stochastic(size_t n, size_t offset, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<float> in = random_floats(n, rng);
  for (auto& x : in) x *= 10.0f;
  DeviceBuffer<float> d_in(n + offset);
  DeviceBuffer<bf16> d_out(n + offset);
  put(d_in.ptr + offset, in);
  std::vector<uint16_t> first;
  for (const Schedule& sch : test_schedules()) {
    ScopedSchedule scope(sch);
    INFO("stochastic n " << n << " offset " << offset << " schedule " << sch.name());
    d_out.poison();
    mk::convert_to_bf16_stochastic(d_out.ptr + offset, d_in.ptr + offset, n, 1234, nullptr);
    const std::vector<bf16> out = get(d_out.ptr + offset, n);
    std::vector<uint16_t> bits(n);
    size_t wrong = 0, not_neighbour = 0;
    for (size_t i = 0; i < n; ++i) {
      bits[i] = mk::bf16_bits(out[i]);
      wrong +=
          bits[i] != mk::bf16_bits(mk::float_to_bf16_stochastic(in[i], mk::random_u32(1234, i)));
      uint32_t u;
      std::memcpy(&u, &in[i], sizeof u);
      const uint16_t lo = static_cast<uint16_t>(u >> 16);  // truncation toward zero
      not_neighbour += bits[i] != lo && bits[i] != lo + 1;
    }
    CHECK(wrong == 0);
    CHECK(not_neighbour == 0);
    if (first.empty()) first = bits;
    CHECK(bits == first);  // the same for a seed under every schedule
  }
  mk::convert_to_bf16_stochastic(d_out.ptr + offset, d_in.ptr + offset, n, 1235, nullptr);
  const std::vector<bf16> other = get(d_out.ptr + offset, n);
  size_t differ = 0;
  for (size_t i = 0; i < n; ++i) differ += mk::bf16_bits(other[i]) != first[i];
  INFO("elements that round differently with another seed: " << differ << " of " << n);
  CHECK(differ >= n / 8);  // about a third for random values
}

void run_from_bf16(size_t n, size_t offset, unsigned seed) {
  std::mt19937 rng(seed);
  const std::vector<bf16> in = to_storage<bf16>(random_floats(n, rng));
  DeviceBuffer<bf16> d_in(n + offset);
  DeviceBuffer<float> d_out(n + offset);
  put(d_in.ptr + offset, in);
  for (const Schedule& sch : test_schedules()) {
    ScopedSchedule scope(sch);
    INFO("convert_from_bf16 n " << n << " offset " << offset << " schedule " << sch.name());
    d_out.poison();
    mk::convert_from_bf16(d_out.ptr + offset, d_in.ptr + offset, n, nullptr);
    CHECK(get(d_out.ptr + offset, n) == to_float(in));
  }
}

}  // namespace

TEST_CASE("elementwise kernels: add, add_inplace, scale, axpby match the CPU backend",
          "[simt][kernels][elementwise]") {
  g_max_err[0] = g_max_err[1] = 0;
  // Below a pack, one pack, a pack plus leftovers, one block, not a multiple of the block.
  const size_t sizes[] = {1, 3, 8, 37, 256, 4099};
  unsigned seed = 1;
  for (const size_t n : sizes) {
    run_linear<float>(n, 0, seed);
    run_linear<bf16>(n, 0, seed);
    ++seed;
  }
  for (const size_t n : {size_t{37}, size_t{1001}}) {
    run_linear<float>(n, 1, seed);
    run_linear<bf16>(n, 1, seed);
    ++seed;
  }
  if (std::getenv("MOETRAIN_KERNEL_ERRORS"))
    std::printf("elementwise kernels: max relative error fp32 %.3g, bf16 %.3g\n", g_max_err[0],
                g_max_err[1]);
}

TEST_CASE("elementwise kernels: convert_to_bf16 rounds to nearest even, strided",
          "[simt][kernels][elementwise]") {
  // Scalar path (odd widths or strides) and 4-wide packs, with and without padding columns.
  const Strided cases[] = {
      {1, 1, 1, 1}, {37, 50, 53, 61}, {20, 64, 64, 64}, {5, 8, 12, 16}, {3, 300, 300, 304}};
  unsigned seed = 40;
  for (const Strided& c : cases) run_convert_strided(c, seed++);
  // The tie cases in conversion_inputs, by hand.
  CHECK(rne_bits(1.0f + std::ldexp(1.0f, -8)) == 0x3f80u);
  CHECK(rne_bits(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3f82u);
}

TEST_CASE("elementwise kernels: convert_to_bf16_stochastic is deterministic per seed",
          "[simt][kernels][elementwise]") {
  run_stochastic(1, 0, 60);
  run_stochastic(4099, 0, 61);
  run_stochastic(1001, 1, 62);  // scalar path: the same bits as the packed one for the same index
}

TEST_CASE("elementwise kernels: convert_to_bf16_stochastic is unbiased",
          "[simt][kernels][elementwise]") {
  const size_t n = 20000;
  const float ulp = std::ldexp(1.0f, -7);  // bf16 spacing in [1, 2)
  DeviceBuffer<float> d_in(n);
  DeviceBuffer<bf16> d_out(n);
  for (const float frac : {0.3f, 0.9f}) {
    for (const float sign : {1.0f, -1.0f}) {
      const float x = sign * (1.0f + 5 * ulp + frac * ulp);
      d_in.upload(std::vector<float>(n, x));
      d_out.poison();
      mk::convert_to_bf16_stochastic(d_out.ptr, d_in.ptr, n, 99, nullptr);
      double mean = 0;
      for (const bf16 c : d_out.download()) mean += mk::bf16_to_float(c);
      mean /= double(n);
      const double se = ulp * std::sqrt(double(frac) * (1 - frac) / double(n));
      INFO("x " << x << " mean " << mean << " standard error " << se);
      CHECK(std::fabs(mean - double(x)) <= 4 * se);
    }
  }
}

TEST_CASE("elementwise kernels: scale_matrix scales a strided matrix and s = 0 clears it",
          "[simt][kernels][elementwise]") {
  const int rows = 37, cols = 45, ld = 48;
  std::vector<float> x(std::size_t(rows) * ld);
  std::mt19937 gen(80);
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  for (auto& v : x) v = dist(gen);
  x[5] = std::nanf("");            // inside the matrix
  x[std::size_t(ld) + 46] = 7.0f;  // padding: never touched
  x[std::size_t(ld) * 3 + 47] = std::nanf("");
  for (const Schedule& sch : test_schedules()) {
    ScopedSchedule scope(sch);
    for (const float s : {2.5f, 1.0f, 0.0f}) {
      INFO("schedule " << sch.name() << ", s " << s);
      DeviceBuffer<float> d(x);
      mk::scale_matrix(d.ptr, ld, rows, cols, s, nullptr);
      const std::vector<float> got = d.download();
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < ld; ++c) {
          const std::size_t i = std::size_t(r) * ld + std::size_t(c);
          const float want = c >= cols ? x[i] : s == 0.0f ? 0.0f : x[i] * s;
          if (std::isnan(want)) {
            CHECK(std::isnan(got[i]));
          } else {
            CHECK(got[i] == want);
          }
        }
    }
  }
}

TEST_CASE("elementwise kernels: convert_from_bf16 is exact", "[simt][kernels][elementwise]") {
  run_from_bf16(1, 0, 70);
  run_from_bf16(4099, 0, 71);
  run_from_bf16(1001, 1, 72);
}

TEST_CASE("elementwise kernels: empty sizes launch nothing", "[simt][kernels][elementwise]") {
  float* f = nullptr;
  bf16* h = nullptr;
  CHECK_NOTHROW(mk::add_inplace(h, h, 0, nullptr));
  CHECK_NOTHROW(mk::scale(f, 0, 2.0f, nullptr));
  CHECK_NOTHROW(mk::scale_matrix(f, 4, 0, 4, 2.0f, nullptr));
  CHECK_NOTHROW(mk::scale_matrix(f, 4, 3, 0, 2.0f, nullptr));
  CHECK_NOTHROW(mk::axpby(h, h, 0, 1.0f, 2.0f, nullptr));
  CHECK_NOTHROW(mk::convert_to_bf16(h, 4, f, 4, 0, 4, nullptr));
  CHECK_NOTHROW(mk::convert_to_bf16(h, 4, f, 4, 3, 0, nullptr));
  CHECK_NOTHROW(mk::convert_to_bf16_stochastic(h, f, 0, 1, nullptr));
  CHECK_NOTHROW(mk::convert_from_bf16(f, h, 0, nullptr));
}
