// tests/simt/test_simt.cpp — tests of the SIMT simulator itself: exact reductions under every
// schedule, a missing __syncthreads caught, shuffles/votes against a lane-by-lane reference,
// atomics, dynamic shared memory, vector types, bf16 rounding, NaN-poisoned memory, deadlock
// detection and AddressSanitizer on an out-of-bounds kernel write.
#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kernel_test_util.hpp"
#include "test_kernels.hpp"

namespace {

namespace st = moetrain::simt_test;
namespace mk = moetrain::kernels;

using kernel_test::bits_of;
using kernel_test::DeviceBuffer;
using kernel_test::from_bits;

// n draws of U(lo, hi) from a generator seeded with `seed`.
std::vector<float> uniform_floats(size_t n, unsigned seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// The simulated tree order of tree_sum_kernel: level s adds buf[t + s] into buf[t].
template <typename T>
T tree_reference(const T* x) {
  std::vector<T> buf(x, x + st::kTreeBlock);
  for (int s = st::kTreeBlock / 2; s > 0; s >>= 1)
    for (int t = 0; t < s; ++t) buf[t] += buf[t + s];
  return buf[0];
}

// The order of common.cuh's warp butterfly (lane l: v = op(v_l, v_{l ^ offset})) and block_reduce.
template <typename T, typename Op>
T butterfly(std::vector<T> v, Op op) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    std::vector<T> next(32);
    for (int l = 0; l < 32; ++l) next[l] = op(v[l], v[l ^ offset]);
    v = next;
  }
  for (int l = 1; l < 32; ++l)
    REQUIRE(bits_of(static_cast<float>(v[l])) == bits_of(static_cast<float>(v[0])));
  return v[0];
}
template <typename T, typename Op>
T block_reduce_reference(const std::vector<T>& per_thread, Op op, T identity) {
  const size_t nwarps = per_thread.size() / 32;
  std::vector<T> partials(32, identity);
  for (size_t w = 0; w < nwarps; ++w)
    partials[w] = butterfly(
        std::vector<T>(per_thread.begin() + w * 32, per_thread.begin() + (w + 1) * 32), op);
  return butterfly(partials, op);
}

// Runs fn under every standard schedule, as a Catch section each.
void for_each_schedule(const std::function<void()>& fn) {
  for (const simt::Schedule& s : simt::standard_schedules()) {
    DYNAMIC_SECTION("schedule " << s.name()) {
      simt::ScopedSchedule scope(s);
      fn();
    }
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------
TEST_CASE("simt: shared-memory tree reduction is exact under every schedule", "[simt]") {
  const int blocks = 6;
  std::vector<int> xi(blocks * st::kTreeBlock);
  std::mt19937 rng(7);
  for (auto& v : xi) v = static_cast<int>(rng() % 2001) - 1000;
  const std::vector<float> xf = uniform_floats(xi.size(), 11);
  DeviceBuffer<int> din(xi), dout_i(blocks);
  DeviceBuffer<float> dinf(xf), dout_f(blocks);
  for_each_schedule([&] {
    st::tree_sum_i32(din.ptr, dout_i.ptr, blocks, true);
    st::tree_sum_f32(dinf.ptr, dout_f.ptr, blocks, true);
    const auto oi = dout_i.download();
    const auto of = dout_f.download();
    for (int b = 0; b < blocks; ++b) {
      long long expect = 0;
      for (int t = 0; t < st::kTreeBlock; ++t) expect += xi[b * st::kTreeBlock + t];
      CHECK(oi[b] == expect);
      CHECK(bits_of(of[b]) == bits_of(tree_reference(&xf[b * st::kTreeBlock])));
    }
  });
}

TEST_CASE("simt: a missing __syncthreads gives a wrong result under some schedule", "[simt]") {
  const int blocks = 4;
  std::vector<int> xi(blocks * st::kTreeBlock);
  for (size_t i = 0; i < xi.size(); ++i) xi[i] = static_cast<int>(i % 13) + 1;
  const std::vector<float> xf = uniform_floats(xi.size(), 3);
  DeviceBuffer<int> din(xi), dout_i(blocks);
  DeviceBuffer<float> dinf(xf), dout_f(blocks);
  int wrong_int = 0, wrong_float = 0;
  std::vector<std::string> caught_by;
  for (const simt::Schedule& s : simt::standard_schedules()) {
    simt::ScopedSchedule scope(s);
    st::tree_sum_i32(din.ptr, dout_i.ptr, blocks, false);
    st::tree_sum_f32(dinf.ptr, dout_f.ptr, blocks, false);
    const auto oi = dout_i.download();
    const auto of = dout_f.download();
    bool wrong = false;
    for (int b = 0; b < blocks; ++b) {
      long long expect = 0;
      for (int t = 0; t < st::kTreeBlock; ++t) expect += xi[b * st::kTreeBlock + t];
      if (oi[b] != expect) ++wrong_int, wrong = true;
      if (bits_of(of[b]) != bits_of(tree_reference(&xf[b * st::kTreeBlock])))
        ++wrong_float, wrong = true;
    }
    if (wrong) caught_by.push_back(s.name());
  }
  INFO("schedules that caught the race: " << caught_by.size());
  CHECK(wrong_int > 0);
  CHECK(wrong_float > 0);
  // Forward runs thread 0 first: it reads buf[128] before thread 128 stored it.
  REQUIRE(!caught_by.empty());
  CHECK(caught_by.front() == "forward");
}

TEST_CASE("simt: block_sum and block_max of common.cuh are exact and ordered", "[simt]") {
  const int blocks = 3, n = 1000;
  const std::vector<float> x = uniform_floats(static_cast<size_t>(blocks) * n, 5, -4.0f, 3.0f);
  std::vector<long long> xl(x.size());
  for (size_t i = 0; i < x.size(); ++i)
    xl[i] = static_cast<long long>(i * 2654435761u % 100003) - 50000;
  DeviceBuffer<float> din(x), sums(blocks), maxs(blocks);
  DeviceBuffer<long long> dinl(xl), suml(blocks);
  for (const dim3 block : {dim3(256), dim3(32), dim3(32, 4), dim3(64, 2, 2), dim3(1024)}) {
    const unsigned nt = block.x * block.y * block.z;
    DYNAMIC_SECTION("block " << block.x << "x" << block.y << "x" << block.z) {
      for_each_schedule([&] {
        st::block_reduce_f32(din.ptr, sums.ptr, maxs.ptr, n, blocks, block);
        st::block_sum_i64(dinl.ptr, suml.ptr, n, blocks, block);
        const auto s = sums.download(), m = maxs.download();
        const auto sl = suml.download();
        for (int b = 0; b < blocks; ++b) {
          std::vector<float> ps(nt, 0.0f), pm(nt, -INFINITY);
          std::vector<long long> pl(nt, 0);
          long long exact = 0;
          for (unsigned r = 0; r < nt; ++r) {
            for (unsigned i = r; i < static_cast<unsigned>(n); i += nt) {
              ps[r] += x[b * n + i];
              pm[r] = std::fmax(pm[r], x[b * n + i]);
              pl[r] += xl[b * n + i];
            }
          }
          for (int i = 0; i < n; ++i) exact += xl[b * n + i];
          const float ref_s = block_reduce_reference(
              ps, [](float a, float c) { return a + c; }, 0.0f);
          const float ref_m = block_reduce_reference(
              pm, [](float a, float c) { return std::fmax(a, c); }, -INFINITY);
          CHECK(bits_of(s[b]) == bits_of(ref_s));
          CHECK(m[b] == ref_m);
          CHECK(m[b] == *std::max_element(x.begin() + b * n, x.begin() + (b + 1) * n));
          CHECK(sl[b] == exact);
        }
      });
    }
  }
}

// ------------------------------------------------------------------------------------------------
namespace {
// Lane-by-lane reference of the shuffles, from the CUDA Programming Guide's definitions.
int ref_shfl_idx(const std::vector<int>& v, int t, int src, int width) {
  const int lane = t % 32, warp0 = t - lane;
  return v[warp0 + (lane / width) * width + src % width];
}
int ref_shfl_up(const std::vector<int>& v, int t, int delta, int width) {
  const int lane = t % 32;
  return lane % width >= delta ? v[t - delta] : v[t];
}
int ref_shfl_down(const std::vector<int>& v, int t, int delta, int width) {
  const int lane = t % 32;
  return lane % width + delta < width ? v[t + delta] : v[t];
}
int ref_shfl_xor(const std::vector<int>& v, int t, int mask, int width) {
  const int lane = t % 32, warp0 = t - lane, src = lane ^ mask;
  return src < (lane / width + 1) * width ? v[warp0 + src] : v[t];  // later groups: own value
}
}  // namespace

TEST_CASE("simt: shuffles match a lane-by-lane reference", "[simt]") {
  const int n = st::kShflThreads;
  std::vector<int> in(n);
  for (int t = 0; t < n; ++t)
    in[t] = 1000 + t * 37 % 101;  // (the bf16 copies round: compared as bf16)
  std::vector<int> args, widths;
  for (int w : {32, 16, 8, 4, 2, 1})
    for (int a : {0, 1, 2, 3, 5, 7, 8, 15, 16, 17, 31}) args.push_back(a), widths.push_back(w);
  const int ncases = static_cast<int>(args.size());
  DeviceBuffer<int> din(in), dargs(args), dwidths(widths),
      oi(static_cast<size_t>(ncases) * st::kShflOps * n);
  DeviceBuffer<float> of(oi.n);
  DeviceBuffer<__nv_bfloat16> ob(oi.n);
  DeviceBuffer<double> od(oi.n);
  for_each_schedule([&] {
    st::shuffles(din.ptr, dargs.ptr, dwidths.ptr, ncases, oi.ptr, of.ptr, ob.ptr, od.ptr);
    const auto ri = oi.download();
    const auto rf = of.download();
    const auto rb = ob.download();
    const auto rd = od.download();
    int mismatches = 0;
    for (int c = 0; c < ncases; ++c) {
      const int a = args[c], w = widths[c];
      for (int t = 0; t < n; ++t) {
        const size_t o = static_cast<size_t>(c) * st::kShflOps * n + t;
        const int src = (a + 7 * (t % 32)) & 63;
        const int e_idx = ref_shfl_idx(in, t, src, w);
        const int e_up = ref_shfl_up(in, t, a & 31, w);
        const int e_down = ref_shfl_down(in, t, a & 31, w);
        const int e_xor = ref_shfl_xor(in, t, a & 31, w);
        const bool ok = ri[o] == e_idx && ri[o + n] == e_up && ri[o + 2 * n] == e_down &&
                        ri[o + 3 * n] == e_xor &&
                        rf[o + 4 * n] == static_cast<float>(e_xor) * 0.5f &&
                        mk::bf16_bits(rb[o + 5 * n]) ==
                            mk::bf16_bits(mk::float_to_bf16(static_cast<float>(e_idx))) &&
                        rd[o + 6 * n] == static_cast<double>(e_down) * 0.25 + 1e10;
        if (!ok && ++mismatches <= 5) {
          FAIL_CHECK("case arg " << a << " width " << w << " thread " << t << ": idx " << ri[o]
                                 << "/" << e_idx << " up " << ri[o + n] << "/" << e_up << " down "
                                 << ri[o + 2 * n] << "/" << e_down << " xor " << ri[o + 3 * n]
                                 << "/" << e_xor);
        }
      }
    }
    CHECK(mismatches == 0);
  });
}

TEST_CASE("simt: ballot, any, all, reductions and half-warp collectives match a reference",
          "[simt]") {
  const int n = st::kShflThreads;
  std::vector<unsigned> values(n);
  std::vector<int> preds(n);
  std::mt19937 rng(99);
  for (int t = 0; t < n; ++t) {
    values[t] = rng() % 100000u;
    preds[t] = (t % 3 == 0) || (t >= 32 && t < 48);  // warp 1's low half all true
  }
  DeviceBuffer<unsigned> dv(values), out(static_cast<size_t>(st::kVoteOutputs) * n);
  DeviceBuffer<int> dp(preds);
  for_each_schedule([&] {
    st::vote(dv.ptr, dp.ptr, out.ptr);
    const auto r = out.download();
    for (int t = 0; t < n; ++t) {
      const int lane = t % 32, w0 = t - lane, h0 = w0 + (lane < 16 ? 0 : 16);
      unsigned ballot = 0, half_ballot = 0, sum = 0, half_sum = 0, umin = ~0u, umax = 0, vand = ~0u,
               vor = 0, vxor = 0;
      int imin = INT32_MAX, imax = INT32_MIN;
      for (int l = 0; l < 32; ++l) {
        const unsigned v = values[w0 + l];
        if (preds[w0 + l]) ballot |= 1u << l;
        sum += v, umin = std::min(umin, v), umax = std::max(umax, v), vand &= v, vor |= v,
                  vxor ^= v;
        imin = std::min(imin, static_cast<int>(v)), imax = std::max(imax, static_cast<int>(v));
      }
      for (int l = h0 - w0; l < h0 - w0 + 16; ++l) {
        if (preds[w0 + l]) half_ballot |= 1u << l;
        half_sum += values[w0 + l];
      }
      const unsigned half_mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
      const unsigned expect[st::kVoteOutputs] = {ballot,
                                                 ballot != 0,
                                                 ballot == 0xffffffffu,
                                                 half_ballot,
                                                 half_ballot != 0,
                                                 half_ballot == half_mask,
                                                 values[t ^ 1],
                                                 values[w0 + (lane / 16) * 16 + 3],
                                                 sum,
                                                 umin,
                                                 umax,
                                                 static_cast<unsigned>(imin),
                                                 static_cast<unsigned>(imax),
                                                 vand,
                                                 vor,
                                                 vxor,
                                                 half_sum,
                                                 sum,
                                                 static_cast<unsigned>(imax),
                                                 static_cast<unsigned>(imin)};
      for (int k = 0; k < st::kVoteOutputs; ++k) {
        INFO("thread " << t << " output " << k);
        CHECK(r[static_cast<size_t>(k) * n + t] == expect[k]);
      }
    }
  });
}

TEST_CASE("simt: __syncthreads_count / _and / _or", "[simt]") {
  for (const int threads : {32, 96, 256}) {
    std::vector<int> preds(threads);
    for (int t = 0; t < threads; ++t) preds[t] = t % 5 == 1;
    DeviceBuffer<int> dp(preds), out(3);
    st::barrier_votes(dp.ptr, threads, out.ptr);
    const auto r = out.download();
    CHECK(r[0] == (threads + 3) / 5);
    CHECK(r[1] == 0);
    CHECK(r[2] == 1);
    std::fill(preds.begin(), preds.end(), 1);
    dp.upload(preds);
    st::barrier_votes(dp.ptr, threads, out.ptr);
    const auto r2 = out.download();
    CHECK(r2[0] == threads);
    CHECK(r2[1] == 1);
  }
}

// ------------------------------------------------------------------------------------------------
TEST_CASE("simt: atomics across blocks and threads are exact", "[simt]") {
  const int blocks = 37, threads = 96;
  for_each_schedule([&] {
    DeviceBuffer<int> ints(std::vector<int>{0, INT32_MIN, INT32_MAX, 0, 0});
    DeviceBuffer<unsigned> uints(std::vector<unsigned>{0u, 0u});
    DeviceBuffer<unsigned long long> ull(std::vector<unsigned long long>{5ull});
    DeviceBuffer<float> floats(std::vector<float>{0.0f});
    st::atomics(blocks, threads, ints.ptr, uints.ptr, ull.ptr, floats.ptr);
    const auto i = ints.download();
    const auto u = uints.download();
    const long long total = static_cast<long long>(blocks) * threads;
    CHECK(i[0] == blocks * threads * (threads + 1) / 2);
    CHECK(i[1] == (blocks - 1) * 1000 + threads - 1);
    CHECK(i[2] == -((blocks - 1) * 1000 + threads - 1));
    CHECK(i[3] == total);
    CHECK(i[4] == total);
    CHECK(u[0] == static_cast<unsigned>(threads * blocks * (blocks - 1) / 2));
    CHECK(u[1] == static_cast<unsigned>(total % 8));
    CHECK(ull.download()[0] == 5ull + (static_cast<unsigned long long>(total) << 33));
    CHECK(floats.download()[0] == static_cast<float>(total));
  });
}

// ------------------------------------------------------------------------------------------------
TEST_CASE("simt: vector types have CUDA's layout and dynamic shared memory works", "[simt]") {
  static_assert(sizeof(float4) == 16 && alignof(float4) == 16);
  static_assert(sizeof(float2) == 8 && alignof(float2) == 8);
  static_assert(sizeof(float3) == 12 && alignof(float3) == 4);
  static_assert(sizeof(int4) == 16 && alignof(int4) == 16);
  static_assert(sizeof(int2) == 8 && alignof(int2) == 8);
  static_assert(sizeof(uint4) == 16 && alignof(double2) == 16);
  static_assert(sizeof(__nv_bfloat16) == 2 && sizeof(__nv_bfloat162) == 4 &&
                alignof(__nv_bfloat162) == 4);
  static_assert(std::is_trivially_copyable_v<__nv_bfloat16> &&
                std::is_trivially_default_constructible_v<float4>);
  const int blocks = 3, threads = 64, n = blocks * threads;
  std::vector<float4> in(n);
  std::vector<int2> in2(n);
  for (int i = 0; i < n; ++i) {
    in[i] = make_float4(i + 0.25f, i + 0.5f, i + 0.75f, static_cast<float>(-i));
    in2[i] = make_int2(i, -3 * i);
  }
  DeviceBuffer<float4> din(in), dout(n);
  DeviceBuffer<int2> din2(in2), dout2(n);
  for_each_schedule([&] {
    st::reverse_vec(din.ptr, dout.ptr, din2.ptr, dout2.ptr, blocks, threads);
    const auto o = dout.download();
    const auto o2 = dout2.download();
    for (int b = 0; b < blocks; ++b) {
      for (int t = 0; t < threads; ++t) {
        const float4 e = in[b * threads + threads - 1 - t];
        const float4 g = o[b * threads + t];
        CHECK((g.x == e.w && g.y == e.z && g.z == e.y && g.w == e.x));
        const int2 e2 = in2[b * threads + threads - 1 - t];
        CHECK((o2[b * threads + t].x == e2.y && o2[b * threads + t].y == e2.x));
      }
    }
  });
}

namespace {
// Reference fp32 -> bf16 round-to-nearest-even on the integer bits, written from the definition.
uint16_t ref_bf16_rne(float f) {
  const uint32_t u = bits_of(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  const uint32_t hi = u >> 16, lo = u & 0xffffu;
  if (lo > 0x8000u || (lo == 0x8000u && (hi & 1u))) return static_cast<uint16_t>(hi + 1);
  return static_cast<uint16_t>(hi);
}
}  // namespace

TEST_CASE("simt: bf16 round-to-nearest-even and stochastic rounding on boundary cases", "[simt]") {
  std::vector<float> x = {
      0.0f,
      -0.0f,
      1.0f,
      -1.0f,
      from_bits(0x3f808000u),  // 1 + 2^-8: exactly halfway, even below -> stays 0x3f80
      from_bits(0x3f818000u),  // halfway, odd below -> rounds up to 0x3f82
      from_bits(0x3f808001u),  // just above halfway -> up
      from_bits(0x3f807fffu),  // just below halfway -> down
      from_bits(0xbf818000u),  // negative halfway, odd -> away from zero
      from_bits(0x7f7fffffu),  // largest float -> inf
      from_bits(0x7f7f7fffu),  // rounds down to the largest bf16
      from_bits(0x7f7f8000u),  // halfway above the largest bf16 (odd) -> inf
      INFINITY,
      -INFINITY,
      NAN,
      from_bits(0xffc00001u),
      from_bits(0x00000001u),  // smallest subnormal -> 0
      from_bits(0x00008000u),  // subnormal halfway, even -> 0
      from_bits(0x00018000u),  // subnormal halfway, odd -> up
      from_bits(0x80018000u),
      3.14159265f,
      1e-30f,
      -65504.0f,
      1.0e38f};
  const size_t fixed = x.size();
  for (float v : uniform_floats(1000, 17, -1e3f, 1e3f)) x.push_back(v);
  const int n = static_cast<int>(x.size());
  std::vector<unsigned> rand(n);
  std::mt19937 rng(4);
  for (int i = 0; i < n; ++i)
    rand[i] = i < static_cast<int>(fixed) ? (i % 2 ? 0xffffu : 0u) : static_cast<unsigned>(rng());
  DeviceBuffer<float> dx(x), back(n);
  DeviceBuffer<unsigned> dr(rand);
  DeviceBuffer<__nv_bfloat16> rn(n), sr(n);
  st::bf16_convert(dx.ptr, dr.ptr, n, rn.ptr, back.ptr, sr.ptr);
  const auto h = rn.download();
  const auto b = back.download();
  const auto s = sr.download();
  for (int i = 0; i < n; ++i) {
    INFO("i = " << i << " x bits " << std::hex << bits_of(x[i]));
    const uint16_t e = ref_bf16_rne(x[i]);
    CHECK(mk::bf16_bits(h[i]) == e);
    if (std::isnan(x[i])) {
      CHECK(std::isnan(b[i]));
      CHECK(mk::bf16_bits(s[i]) == 0x7fffu);
      continue;
    }
    CHECK(bits_of(b[i]) == static_cast<uint32_t>(e) << 16);
    // Stochastic: one of the two neighbours; rand 0 truncates; rand 0xffff rounds any inexact
    // value up.
    const uint32_t u = bits_of(x[i]);
    const uint16_t down = static_cast<uint16_t>(u >> 16);
    const uint16_t got = mk::bf16_bits(s[i]);
    if (std::isinf(x[i])) {
      CHECK(got == down);
    } else if ((u & 0xffffu) == 0) {
      CHECK(got == down);
    } else {
      CHECK((got == down || got == down + 1));
      if ((rand[i] & 0xffffu) == 0) CHECK(got == down);
      if ((rand[i] & 0xffffu) == 0xffffu) CHECK(got == down + 1);
    }
  }
  // Host-side helpers agree with the kernel, and stochastic rounding is unbiased on average.
  CHECK(mk::bf16_bits(mk::float_to_bf16(from_bits(0x3f818000u))) == 0x3f82u);
  const float v = from_bits(0x3f80c000u);  // 75% of the way from 0x3f80 to 0x3f81
  double mean = 0.0;
  const int trials = 20000;
  for (int i = 0; i < trials; ++i)
    mean += mk::bf16_to_float(mk::float_to_bf16_stochastic(v, mk::random_u32(9, i)));
  mean /= trials;
  CHECK(std::fabs(mean - v) < 2e-4);
}

// ------------------------------------------------------------------------------------------------
thread_local int host_tls_value = 1234;

TEST_CASE("simt: unwritten memory reads as NaN and stale shared memory does not leak", "[simt]") {
  const int n = 100;
  DeviceBuffer<float> out(n);
  for (float v : out.download()) CHECK(std::isnan(v));
  st::write_even(out.ptr, n);
  const auto o = out.download();
  for (int i = 0; i < n; ++i) {
    if (i % 2 == 0)
      CHECK(o[i] == static_cast<float>(i));
    else
      CHECK(std::isnan(o[i]));
  }
  host_tls_value = 4321;
  for_each_schedule([&] {
    const int blocks = 5;
    DeviceBuffer<float> s(blocks);
    st::stale_shared(s.ptr, blocks);
    const auto r = s.download();
    CHECK(r[0] == 42.0f);
    for (int b = 1; b < blocks; ++b) CHECK(std::isnan(r[b]));
  });
  CHECK(host_tls_value == 4321);  // the launching thread's thread_locals are restored
}

// ------------------------------------------------------------------------------------------------
TEST_CASE("simt: deadlocks and divergent collectives throw clear errors", "[simt]") {
  using Catch::Matchers::Contains;
  // The error is thrown by the launch (eager stream schedule) or by the synchronisation that runs
  // the kernel (deferred).
  const auto synchronize = [] { MOETRAIN_CUDA_CHECK(cudaDeviceSynchronize()); };
  DeviceBuffer<int> out(256);
  DeviceBuffer<float> fin(std::vector<float>(64, 1.0f)), fout(64);
  for_each_schedule([&] {
    CHECK_THROWS_WITH((st::exit_before_barrier(out.ptr), synchronize()),
                      Contains("exit_before_barrier_kernel") && Contains("block (") &&
                          Contains("thread (5,0,0)") && Contains("__syncthreads"));
    CHECK_THROWS_WITH((st::barrier_vs_shuffle(out.ptr), synchronize()),
                      Contains("barrier_vs_shuffle_kernel") && Contains("deadlock") &&
                          Contains("__shfl_xor_sync") && Contains("wait at __syncthreads"));
    CHECK_THROWS_WITH((st::divergent_collectives(out.ptr), synchronize()),
                      Contains("divergent warp collectives") && Contains("__ballot_sync") &&
                          Contains("__shfl_xor_sync"));
    CHECK_THROWS_WITH((st::exit_before_shuffle(out.ptr), synchronize()),
                      Contains("exited") && Contains("__shfl_xor_sync"));
    CHECK_THROWS_WITH((st::partial_warp_sum(fin.ptr, fout.ptr), synchronize()),
                      Contains("do not exist"));
    // The simulator recovers: a good kernel runs right after.
    DeviceBuffer<float> sums(2), maxs(2);
    st::block_reduce_f32(fin.ptr, sums.ptr, maxs.ptr, 32, 2, dim3(32));
    CHECK(sums.download()[0] == 32.0f);
  });
  CHECK_THROWS_WITH(st::launch_with(dim3(1), dim3(1025), 0, out.ptr), Contains("1024 threads"));
  CHECK_THROWS_WITH(st::launch_with(dim3(1), dim3(1, 1, 65), 0, out.ptr), Contains("too large"));
  CHECK_THROWS_WITH(st::launch_with(dim3(0), dim3(32), 0, out.ptr), Contains("empty grid"));
  CHECK_THROWS_WITH(st::launch_with(dim3(1), dim3(32), 200 * 1024, out.ptr),
                    Contains("shared memory"));
  CHECK_THROWS_AS(st::launch_with(dim3(1), dim3(1025), 0, out.ptr), std::runtime_error);
  st::launch_with(dim3(2, 3, 4), dim3(4, 4, 4), 1024, out.ptr);
  CHECK(out.download()[0] == 1);
}

TEST_CASE("simt: runtime API: errors, events, memset and schedules", "[simt]") {
  EACH_STREAM_SCHEDULE();
  void* p = nullptr;
  CHECK(cudaMalloc(&p, 0) == cudaSuccess);
  CHECK(p == nullptr);
  int local = 0;
  CHECK(cudaFree(&local) == cudaErrorInvalidDevicePointer);
  CHECK(cudaGetLastError() == cudaErrorInvalidDevicePointer);
  CHECK(cudaGetLastError() == cudaSuccess);
  CHECK_THROWS_WITH([&] { MOETRAIN_CUDA_CHECK(cudaFree(&local)); }(),
                    Catch::Matchers::Contains("cudaErrorInvalidDevicePointer"));
  cudaGetLastError();
  DeviceBuffer<int> buf(16);
  CHECK(reinterpret_cast<uintptr_t>(buf.ptr) % 256 == 0);
  MOETRAIN_CUDA_CHECK(cudaMemsetAsync(buf.ptr, 0, 16 * sizeof(int)));
  for (int v : buf.download()) CHECK(v == 0);
  cudaStream_t stream;
  cudaEvent_t a, b;
  MOETRAIN_CUDA_CHECK(cudaStreamCreate(&stream));
  MOETRAIN_CUDA_CHECK(cudaEventCreate(&a));
  MOETRAIN_CUDA_CHECK(cudaEventCreate(&b));
  MOETRAIN_CUDA_CHECK(cudaEventRecord(a, stream));
  st::write_even(reinterpret_cast<float*>(buf.ptr), 16, stream);
  MOETRAIN_CUDA_CHECK(cudaEventRecord(b, stream));
  MOETRAIN_CUDA_CHECK(cudaStreamSynchronize(stream));
  float ms = -1.0f;
  MOETRAIN_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  CHECK(ms >= 0.0f);
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  cudaStreamDestroy(stream);
  CHECK(simt::Schedule::parse("random:42").name() == "random(42)");
  CHECK(simt::Schedule::parse("reverse").kind() == simt::Schedule::Kind::Reverse);
  CHECK_THROWS_AS(simt::Schedule::parse("sideways"), simt::Error);
}

// ------------------------------------------------------------------------------------------------
#if defined(__SANITIZE_ADDRESS__)
TEST_CASE("simt: AddressSanitizer catches an out-of-bounds global write in a kernel", "[simt]") {
  int pipefd[2];
  REQUIRE(pipe(pipefd) == 0);
  std::fflush(nullptr);
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {  // child: its stderr goes to the pipe; ASan must kill it
    close(pipefd[0]);
    dup2(pipefd[1], 2);
    alarm(60);
    float* small = nullptr;
    if (cudaMalloc(&small, 31 * sizeof(float)) != cudaSuccess) _exit(3);
    st::write_per_thread(small, 32);  // thread 31 writes small[31]
    cudaDeviceSynchronize();          // (it runs here under the deferred stream schedule)
    _exit(0);
  }
  close(pipefd[1]);
  std::string report;
  char buf[4096];
  for (ssize_t got; (got = read(pipefd[0], buf, sizeof buf)) > 0;)
    report.append(buf, static_cast<size_t>(got));
  close(pipefd[0]);
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  INFO(report);
  CHECK(!(WIFEXITED(status) && WEXITSTATUS(status) == 0));
  CHECK(report.find("AddressSanitizer: heap-buffer-overflow") != std::string::npos);
  CHECK(report.find("write_per_thread_kernel") != std::string::npos);
}
#endif

// ------------------------------------------------------------------------------------------------
TEST_CASE("simt: switch rate", "[simt][.perf]") {
  const int blocks = 64, threads = 256, iters = 50;
  DeviceBuffer<float> out(blocks);
  for (const simt::Schedule& s : simt::standard_schedules()) {
    simt::ScopedSchedule scope(s);
    simt::reset_stats();
    const auto t0 = std::chrono::steady_clock::now();
    st::sync_heavy(out.ptr, blocks, threads, iters);
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const simt::Stats stats = simt::stats();
    std::printf(
        "simt %-10s: %llu switches in %.3f s = %.1f M switches/s (%llu blocks, %llu threads)\n",
        s.name().c_str(), static_cast<unsigned long long>(stats.switches), sec,
        stats.switches / sec / 1e6, static_cast<unsigned long long>(stats.blocks),
        static_cast<unsigned long long>(stats.threads));
  }
}
