// tests/simt/test_mma.cpp — kernels/mma.cuh (mma.sync m16n8k16 bf16 and ldmatrix) against the PTX
// ISA's fragment tables, written out here element by element, independently of the header:
//   * mma on random fragments of two warps, lane by lane, against D = A * B + C in double (exact
//     for small integers, within a few fp32 roundings for normal values), in and out of place;
//   * ldmatrix x1/x2/x4 and .trans on scattered rows of distinct values: every lane's registers
//     hold exactly the elements the ISA names;
//   * a tiled GEMM built on both (tests/simt/mma_test_kernels.cu), B loaded by each of the header's
//     recipes, on sizes with tails, against CpuBackend<float>::gemm on the bf16-rounded inputs;
//   * in the simulator only: a lane that skips the mma, lanes that execute it from different
//     branches or execute another collective, a partial warp, and bad ldmatrix row addresses are
//     reported as simt::Error.
// Every case runs under each schedule of test_schedules() (once, "device", on a GPU).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernel_test_util.hpp"
#include "mma_test_kernels.hpp"
#include "moetrain/cpu_backend.hpp"

namespace {

using namespace kernel_test;
namespace mt = moetrain::mma_test;

// ---- PTX ISA "Matrix Fragments for mma.m16n8k16 with floating point type"
// ------------------------ Element i of a lane's fragment (i = 2 * register + half, the low half
// first) -> (row, column) of its matrix, as the ISA's formulas state them (groupID = lane >> 2,
// threadID_in_group = lane % 4).
struct Pos {
  int row, col;
};
int group_id(int lane) {
  return lane >> 2;
}
int thread_in_group(int lane) {
  return lane % 4;
}
Pos a_pos(int lane, int i) {  // A, 16x16 bf16: a0..a7 in four .b32 registers
  const bool first_rows = i < 2 || (4 <= i && i < 6);
  const int row = first_rows ? group_id(lane) : group_id(lane) + 8;
  const int col = thread_in_group(lane) * 2 + (i & 1) + (i >= 4 ? 8 : 0);
  return {row, col};
}
Pos b_pos(int lane, int i) {  // B, 16x8 bf16 (K x N): b0..b3 in two .b32 registers
  return {thread_in_group(lane) * 2 + (i & 1) + (i >= 2 ? 8 : 0), group_id(lane)};
}
Pos c_pos(int lane, int i) {  // C and D, 16x8 fp32: c0..c3
  return {i < 2 ? group_id(lane) : group_id(lane) + 8, thread_in_group(lane) * 2 + (i & 1)};
}

uint32_t bf16_bits_of(float x) {  // x representable in bf16
  return mk::bf16_bits(mk::float_to_bf16(x));
}

// One warp's matrices: A 16x16, B 16x8 (K x N), C 16x8, row-major; A and B hold bf16 values.
struct WarpMma {
  std::vector<float> A, B, C;
};

enum class Values { SmallIntegers, Normal, WideRange };

WarpMma random_mma(Values kind, std::mt19937& rng) {
  WarpMma m{std::vector<float>(256), std::vector<float>(128), std::vector<float>(128)};
  std::uniform_int_distribution<int> small(-8, 8), acc(-64, 64), exponent(-12, 12);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const auto value = [&](bool accumulator) {
    switch (kind) {
      case Values::SmallIntegers:
        return static_cast<float>(accumulator ? acc(rng) : small(rng));
      case Values::Normal:
        return normal(rng) * (accumulator ? 4.0f : 1.0f);
      case Values::WideRange:
        return std::ldexp(normal(rng), exponent(rng));
    }
    return 0.0f;
  };
  for (auto& x : m.A) x = mk::bf16_to_float(mk::float_to_bf16(value(false)));
  for (auto& x : m.B) x = mk::bf16_to_float(mk::float_to_bf16(value(false)));
  for (auto& x : m.C) x = value(true);
  return m;
}

// Lane `lane`'s registers of the warp's matrices.
void pack_fragments(const WarpMma& m, int lane, uint32_t* a, uint32_t* b, float* c) {
  for (int r = 0; r < 4; ++r) {
    const Pos lo = a_pos(lane, 2 * r), hi = a_pos(lane, 2 * r + 1);
    a[r] = bf16_bits_of(m.A[lo.row * 16 + lo.col]) | bf16_bits_of(m.A[hi.row * 16 + hi.col]) << 16;
  }
  for (int r = 0; r < 2; ++r) {
    const Pos lo = b_pos(lane, 2 * r), hi = b_pos(lane, 2 * r + 1);
    b[r] = bf16_bits_of(m.B[lo.row * 8 + lo.col]) | bf16_bits_of(m.B[hi.row * 8 + hi.col]) << 16;
  }
  for (int i = 0; i < 4; ++i) {
    const Pos p = c_pos(lane, i);
    c[i] = m.C[p.row * 8 + p.col];
  }
}

TEST_CASE("mma: the test's fragment tables cover each matrix exactly once", "[simt][mma]") {
  std::vector<int> a(256, 0), b(128, 0), c(128, 0);
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 8; ++i) ++a[a_pos(lane, i).row * 16 + a_pos(lane, i).col];
    for (int i = 0; i < 4; ++i) ++b[b_pos(lane, i).row * 8 + b_pos(lane, i).col];
    for (int i = 0; i < 4; ++i) ++c[c_pos(lane, i).row * 8 + c_pos(lane, i).col];
  }
  CHECK(std::all_of(a.begin(), a.end(), [](int n) { return n == 1; }));
  CHECK(std::all_of(b.begin(), b.end(), [](int n) { return n == 1; }));
  CHECK(std::all_of(c.begin(), c.end(), [](int n) { return n == 1; }));
}

TEST_CASE("mma: m16n8k16 bf16 computes D = A * B + C on the PTX fragment layout", "[simt][mma]") {
  constexpr int kWarps = 2;  // the warps of one block compute independently
  const auto kind = GENERATE(Values::SmallIntegers, Values::Normal, Values::WideRange);
  const bool in_place = GENERATE(false, true);
  INFO("values " << static_cast<int>(kind) << (in_place ? ", in place" : ", d != c"));
  std::mt19937 rng(1234u + static_cast<unsigned>(kind));
  std::vector<WarpMma> warps;
  std::vector<uint32_t> a(kWarps * 32 * 4), b(kWarps * 32 * 2);
  std::vector<float> c(kWarps * 32 * 4);
  for (int w = 0; w < kWarps; ++w) {
    warps.push_back(random_mma(kind, rng));
    for (int lane = 0; lane < 32; ++lane) {
      const int x = w * 32 + lane;
      pack_fragments(warps[w], lane, &a[4 * x], &b[2 * x], &c[4 * x]);
    }
  }
  DeviceBuffer<uint32_t> d_a(a), d_b(b);
  DeviceBuffer<float> d_c(c), d_d(c.size());
  for (const Schedule& s : test_schedules()) {
    INFO("schedule " << s.name());
    ScopedSchedule scope(s);
    d_d.poison();
    mt::mma_fragments(d_a.ptr, d_b.ptr, d_c.ptr, d_d.ptr, kWarps, in_place);
    const std::vector<float> d = d_d.download();
    int bad = 0;
    double worst = 0;  // |d - ref| / (|C| + sum |A * B|) over every element
    for (int w = 0; w < kWarps; ++w) {
      const WarpMma& m = warps[w];
      for (int lane = 0; lane < 32; ++lane) {
        for (int i = 0; i < 4; ++i) {
          const Pos p = c_pos(lane, i);
          double ref = m.C[p.row * 8 + p.col], mag = std::fabs(ref);
          for (int k = 0; k < 16; ++k) {
            const double prod = double(m.A[p.row * 16 + k]) * double(m.B[k * 8 + p.col]);
            ref += prod;
            mag += std::fabs(prod);
          }
          const double got = d[4 * (w * 32 + lane) + i];
          const double err = std::fabs(got - ref) / std::max(mag, 1e-300);
          worst = std::max(worst, err);
          // Small integers: every partial sum is an exact fp32, in any order. Otherwise 17 terms
          // summed in fp32, in an order the hardware does not specify: 4x the bound of 17
          // roundings by truncation (2^-23 each), relative to the sum of magnitudes.
          const bool ok = kind == Values::SmallIntegers ? got == ref : err <= 0x1p-17;
          if (!ok && bad++ < 8) {
            UNSCOPED_INFO("warp " << w << " lane " << lane << " c" << i << " (row " << p.row
                                  << ", col " << p.col << "): " << got << " vs " << ref);
          }
        }
      }
    }
    INFO("worst relative error " << worst);
    CHECK(bad == 0);
  }
}

// ---- PTX ISA "Warp-level matrix load instruction: ldmatrix"
// --------------------------------------
TEST_CASE("ldmatrix: x1, x2, x4 and .trans deliver each lane the PTX fragments", "[simt][mma]") {
  constexpr int kPoolRows = 48;  // 16-byte rows in shared memory; the lanes address 32 of them
  std::vector<uint16_t> pool(kPoolRows * 8);
  for (size_t e = 0; e < pool.size(); ++e) pool[e] = static_cast<uint16_t>(0x4000 + e);  // distinct
  std::vector<int> rows(kPoolRows);
  std::iota(rows.begin(), rows.end(), 0);
  std::mt19937 rng(99);
  std::shuffle(rows.begin(), rows.end(), rng);  // lane l addresses pool row rows[l]: scattered
  std::vector<int> offset(32);
  for (int l = 0; l < 32; ++l) offset[l] = rows[l] * 8;
  DeviceBuffer<uint16_t> d_pool(pool);
  DeviceBuffer<int> d_offset(offset);
  DeviceBuffer<uint32_t> d_out(32 * 4);

  const auto variant =
      GENERATE(mt::Ldmatrix::X1, mt::Ldmatrix::X2, mt::Ldmatrix::X4, mt::Ldmatrix::X1Trans,
               mt::Ldmatrix::X2Trans, mt::Ldmatrix::X4Trans);
  const int num = mt::matrices(variant);
  const bool trans = mt::transposed(variant);
  INFO("x" << num << (trans ? ".trans" : ""));
  // Matrix q's row i is the row lane 8q + i addresses (lanes from 8 * num on are not used: they
  // address other rows, which must not show up). Element (i, j) goes to lane 4i + j/2, half j % 2
  // of register q; with .trans element (i, j) is (j, i) of the transposed matrix: lane 4j + i/2,
  // half i % 2.
  std::vector<uint32_t> expected(32 * 4, 0);
  for (int q = 0; q < num; ++q) {
    for (int i = 0; i < 8; ++i) {
      for (int j = 0; j < 8; ++j) {
        const uint32_t v = pool[rows[8 * q + i] * 8 + j];
        const int lane = trans ? 4 * j + i / 2 : 4 * i + j / 2;
        const int half = trans ? i % 2 : j % 2;
        expected[4 * lane + q] |= v << (16 * half);
      }
    }
  }
  for (const Schedule& s : test_schedules()) {
    INFO("schedule " << s.name());
    ScopedSchedule scope(s);
    d_out.poison();
    mt::ldmatrix_fragments(variant, d_pool.ptr, static_cast<int>(pool.size()), d_offset.ptr,
                           d_out.ptr, false);
    const std::vector<uint32_t> out = d_out.download();
    int bad = 0;
    for (int lane = 0; lane < 32; ++lane) {
      for (int q = 0; q < num; ++q) {
        if (out[4 * lane + q] != expected[4 * lane + q] && bad++ < 8) {
          UNSCOPED_INFO("lane " << lane << " r" << q << ": " << std::hex << out[4 * lane + q]
                                << " vs " << expected[4 * lane + q] << std::dec);
        }
      }
    }
    CHECK(bad == 0);
  }
}

// ---- ldmatrix + mma: a GEMM
// ----------------------------------------------------------------------
TEST_CASE("mma: a tiled ldmatrix + mma GEMM equals the CPU GEMM", "[simt][mma]") {
  struct Size {
    int M, N, K;
  };
  const Size sz = GENERATE(Size{37, 29, 45}, Size{16, 8, 16}, Size{1, 1, 1}, Size{70, 33, 20});
  const auto variant = GENERATE(mt::GemmB::X4Trans, mt::GemmB::X2Trans, mt::GemmB::X2Transposed);
  const int M = sz.M, N = sz.N, K = sz.K;
  INFO("M " << M << " N " << N << " K " << K << ", B variant " << static_cast<int>(variant));
  std::mt19937 rng(static_cast<unsigned>(M * 10007 + N * 101 + K));
  const std::vector<float> A = representable<bf16>(random_floats(size_t(M) * K, rng));
  const std::vector<float> B = representable<bf16>(random_floats(size_t(K) * N, rng));
  std::vector<float> ref(size_t(M) * N);
  moetrain::CpuBackend<float> cpu;
  cpu.gemm(false, false, M, N, K, 1.0f, A.data(), K, B.data(), N, 0.0f, ref.data(), N);
  std::vector<float> b_in = B;  // X2Transposed takes B^T (N x K)
  if (variant == mt::GemmB::X2Transposed)
    for (int k = 0; k < K; ++k)
      for (int n = 0; n < N; ++n) b_in[size_t(n) * K + k] = B[size_t(k) * N + n];
  DeviceBuffer<bf16> d_a(to_storage<bf16>(A)), d_b(to_storage<bf16>(b_in));
  DeviceBuffer<float> d_c(size_t(M) * N);
  for (const Schedule& s : test_schedules()) {
    INFO("schedule " << s.name());
    ScopedSchedule scope(s);
    d_c.poison();
    mt::gemm_bf16(variant, d_a.ptr, d_b.ptr, d_c.ptr, M, N, K);
    const std::vector<float> c = d_c.download();
    REQUIRE_FALSE(has_nan(c));
    CHECK(rel_error(c, ref) <= 1e-5);
  }
}

#if defined(MOETRAIN_SIMT)

// The message of the simt::Error that fn (and the synchronisation after it) throws.
std::string simt_error(const std::function<void()>& fn) {
  try {
    fn();
    MOETRAIN_CUDA_CHECK(cudaDeviceSynchronize());
  } catch (const simt::Error& e) {
    return e.what();
  }
  return "(no simt::Error)";
}

TEST_CASE("mma: the simulator reports a warp that does not execute the instruction together",
          "[simt][mma]") {
  using Catch::Matchers::Contains;
  const std::string mma = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32";
  DeviceBuffer<float> out(48);
  for (const Schedule& s : test_schedules()) {
    INFO("schedule " << s.name());
    ScopedSchedule scope(s);
    CHECK_THAT(simt_error([&] { mt::mma_bug(mt::MmaBug::LaneExits, out.ptr); }),
               Contains("mma_bug_kernel") && (Contains("lane 5") || Contains("lanes 5")) &&
                   Contains("exited") && Contains(mma));
    CHECK_THAT(simt_error([&] { mt::mma_bug(mt::MmaBug::DivergentBranches, out.ptr); }),
               Contains("divergent warp collectives") && Contains(".aligned") &&
                   Contains("mma_test_kernels.cu:") && Contains(mma));
    CHECK_THAT(simt_error([&] { mt::mma_bug(mt::MmaBug::VersusSyncwarp, out.ptr); }),
               Contains("divergent warp collectives") && Contains("__syncwarp") && Contains(mma));
    CHECK_THAT(
        simt_error([&] { mt::mma_bug(mt::MmaBug::PartialWarp, out.ptr); }),
        Contains("warp 1") && Contains("do not exist") && Contains("48 threads") && Contains(mma));
  }
  // The simulator recovers: a correct mma runs right after.
  std::vector<uint32_t> a(32 * 4, 0x3f803f80u), b(32 * 2, 0x3f803f80u);  // every element 1.0
  DeviceBuffer<uint32_t> d_a(a), d_b(b);
  DeviceBuffer<float> d_c(std::vector<float>(32 * 4, 0.5f)), d_d(32 * 4);
  mt::mma_fragments(d_a.ptr, d_b.ptr, d_c.ptr, d_d.ptr, 1, false);
  const std::vector<float> d = d_d.download();
  CHECK(std::all_of(d.begin(), d.end(), [](float x) { return x == 16.5f; }));
}

TEST_CASE("ldmatrix: the simulator reports row addresses that are misaligned or not shared",
          "[simt][mma]") {
  using Catch::Matchers::Contains;
  std::vector<uint16_t> pool(32 * 8 + 8);
  std::iota(pool.begin(), pool.end(), uint16_t{1});
  std::vector<int> offset(32);
  for (int l = 0; l < 32; ++l) offset[l] = l * 8;
  DeviceBuffer<uint16_t> d_pool(pool);
  DeviceBuffer<int> d_offset(offset);
  DeviceBuffer<uint32_t> d_out(32 * 4);
  const int elems = static_cast<int>(pool.size());
  CHECK_THAT(simt_error([&] {
               mt::ldmatrix_fragments(mt::Ldmatrix::X4, d_pool.ptr, elems, d_offset.ptr, d_out.ptr,
                                      true);
             }),
             Contains("ldmatrix.sync.aligned.m8n8.x4.shared.b16") && Contains("lane 0") &&
                 Contains("not in shared memory"));
  offset[9] += 1;  // lane 9: row 1 of matrix 1, 2 bytes off
  d_offset.upload(offset);
  CHECK_THAT(simt_error([&] {
               mt::ldmatrix_fragments(mt::Ldmatrix::X2Trans, d_pool.ptr, elems, d_offset.ptr,
                                      d_out.ptr, false);
             }),
             Contains("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16") && Contains("lane 9") &&
                 Contains("row 1 of matrix 1") && Contains("not 16-byte aligned"));
  // x1 reads the addresses of lanes 0-7 only: lane 9's is ignored.
  mt::ldmatrix_fragments(mt::Ldmatrix::X1, d_pool.ptr, elems, d_offset.ptr, d_out.ptr, false);
  CHECK(d_out.download()[0] == (uint32_t{pool[0]} | uint32_t{pool[1]} << 16));
}

#endif  // MOETRAIN_SIMT

}  // namespace
