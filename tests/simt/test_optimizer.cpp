// tests/simt/test_optimizer.cpp — kernels/optimizer.cu in the SIMT simulator against the
// CPU backend: AdamW, sum of squares (grad norm), Muon momentum and update, Frobenius
// normalisation and QK-clip row scaling, fp32 within 1e-5 and bf16 within 2e-2 (relative L2), no
// NaN in any output, reductions bit-identical under every schedule; stochastic rounding of the bf16
// weight copies is unbiased (mean of many roundings within a few standard errors) and always one of
// the two neighbouring bf16 values.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "kernel_test_util.hpp"
#include "moetrain/cpu_backend.hpp"
#include "optimizer.cuh"

namespace {

using namespace kernel_test;

template <typename T>
constexpr double tol_of() {
  return std::is_same_v<T, float> ? 1e-5 : 2e-2;
}

// The two bf16 values around x (equal when x is a bf16 value).
void bf16_neighbours(float x, uint16_t& lo, uint16_t& hi) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  lo = static_cast<uint16_t>(u >> 16);  // truncation toward zero
  hi = (u & 0xffffu) ? static_cast<uint16_t>(lo + 1) : lo;
}
// Number of elements of `copy` that are not one of the two bf16 neighbours of `master`.
size_t count_not_neighbour(const std::vector<bf16>& copy, const std::vector<float>& master) {
  size_t bad = 0;
  for (size_t i = 0; i < copy.size(); ++i) {
    uint16_t lo, hi;
    bf16_neighbours(master[i], lo, hi);
    const uint16_t b = mk::bf16_bits(copy[i]);
    if (b != lo && b != hi) ++bad;
  }
  return bad;
}

const std::vector<Schedule>& optimizer_schedules() {
  static const std::vector<Schedule> s =
      kernel_test::schedules({Schedule::forward(), Schedule::reverse(), Schedule::random(5)});
  return s;
}

double g_max_err_f32 = 0, g_max_err_bf16 = 0;
void record(double err, bool bf16_out) {
  double& g = bf16_out ? g_max_err_bf16 : g_max_err_f32;
  g = std::max(g, err);
}

// ---- AdamW --------------------------------------------------------------------------------------
template <typename TW>
void check_adamw(size_t n, unsigned seed, bool with_copy, float grad_scale) {
  constexpr bool kBf16W = std::is_same_v<TW, bf16>;
  std::mt19937 rng(seed);
  const auto w_s = to_storage<TW>(random_floats(n, rng, 0.05f));
  const auto w0 = to_float(w_s);
  const auto g = random_floats(n, rng, 0.01f);
  const auto m0 = random_floats(n, rng, 0.003f);
  auto v0 = random_floats(n, rng, 1e-4f);
  for (auto& x : v0) x = x * x;
  const double lr = 3e-3, b1 = 0.9, b2 = 0.95, eps = 1e-8, wd = 0.1;
  const int64_t t = 7;

  moetrain::CpuBackend<float> be;
  std::vector<float> r_w = w0, r_m = m0, r_v = v0, r_g = g;
  be.scale(r_g.data(), n, grad_scale);  // what the CPU optimizer does before the update
  double r_sq = 0;
  be.adamw_update(r_w.data(), r_g.data(), r_m.data(), r_v.data(), n, lr, b1, b2, eps, wd, t,
                  nullptr, &r_sq);

  DeviceBuffer<TW> d_w(w_s);
  DeviceBuffer<bf16> d_copy(n);
  DeviceBuffer<float> d_g(g), d_m(m0), d_v(v0);
  DeviceBuffer<double> d_ws(mk::optimizer_workspace_elems()), d_sq(1);
  const auto params = mk::adamw_params(lr, b1, b2, eps, wd, t);
  double first_sq = -1;
  for (const Schedule& s : optimizer_schedules()) {
    ScopedSchedule scope(s);
    INFO("adamw " << (kBf16W ? "bf16" : "fp32") << " weights, n " << n << ", schedule "
                  << s.name());
    d_w.upload(w_s);
    d_m.upload(m0);
    d_v.upload(v0);
    d_copy.poison();
    d_sq.poison();
    d_ws.poison();
    mk::adamw_update(d_w.ptr, with_copy ? d_copy.ptr : nullptr, d_g.ptr, grad_scale, d_m.ptr,
                     d_v.ptr, n, params, 1234, 17, nullptr, d_ws.ptr, d_sq.ptr, false, nullptr);
    const auto w = to_float(d_w.download()), m = d_m.download(), v = d_v.download();
    const double sq = d_sq.get();
    REQUIRE_FALSE(has_nan(w));
    REQUIRE_FALSE(has_nan(m));
    REQUIRE_FALSE(has_nan(v));
    REQUIRE(std::isfinite(sq));
    const double ew = rel_error(w, r_w), em = rel_error(m, r_m), ev = rel_error(v, r_v),
                 esq = rel_error(sq, r_sq);
    INFO("errors: w " << ew << " m " << em << " v " << ev << " sumsq " << esq);
    CHECK(ew <= tol_of<TW>());
    CHECK(em <= 1e-5);
    CHECK(ev <= 1e-5);
    CHECK(esq <= 1e-5);
    record(ew, kBf16W);
    record(std::max({em, ev, esq}), false);
    if (with_copy) {
      const auto copy = d_copy.download();
      CHECK(count_not_neighbour(copy, w) == 0);
      const double ec = rel_error(to_float(copy), r_w);
      CHECK(ec <= 2e-2);
      record(ec, true);
    }
    if (first_sq < 0) first_sq = sq;
    CHECK(std::memcmp(&first_sq, &sq, sizeof sq) == 0);
  }
}

// ---- sum of squares -----------------------------------------------------------------------------
template <typename T>
void check_sum_squares(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  const auto x_s = to_storage<T>(random_floats(n, rng, 0.3f));
  const auto x = to_float(x_s);
  moetrain::CpuBackend<float> be;
  double ref = 0;
  be.sum_squares(x.data(), n, &ref);
  double plain_ref = 0;  // the plain sum (cross-entropy's loss sum), in double
  for (float v : x) plain_ref += double(v);
  DeviceBuffer<T> d_x(x_s);
  DeviceBuffer<double> d_ws(mk::optimizer_workspace_elems()), d_out(1);
  double first = -1;
  for (const Schedule& s : optimizer_schedules()) {
    ScopedSchedule scope(s);
    INFO("sum_squares n " << n << ", schedule " << s.name());
    d_out.poison();
    mk::sum_squares(d_x.ptr, n, d_ws.ptr, d_out.ptr, false, nullptr);
    const double v = d_out.get();
    CHECK(rel_error(v, ref) <= 1e-12);
    record(rel_error(v, ref), false);
    mk::sum_squares(d_x.ptr, n, d_ws.ptr, d_out.ptr, true, nullptr);  // accumulate: twice the sum
    CHECK(rel_error(d_out.get(), 2 * ref) <= 1e-12);
    if constexpr (std::is_same_v<T, float>) {
      d_out.poison();
      mk::sum(d_x.ptr, n, d_ws.ptr, d_out.ptr, false, nullptr);
      CHECK(std::fabs(d_out.get() - plain_ref) <= 1e-12 * ref);  // |sum| may be near 0
    }
    if (first < 0) first = v;
    CHECK(std::memcmp(&first, &v, sizeof v) == 0);
  }
}

// ---- Muon ---------------------------------------------------------------------------------------
template <typename TU>
void check_muon_momentum(size_t n, unsigned seed, bool nesterov, float grad_scale) {
  std::mt19937 rng(seed);
  const auto M0 = random_floats(n, rng), G = random_floats(n, rng);
  const float mu = 0.95f;
  moetrain::CpuBackend<float> be;
  std::vector<float> r_M = M0, r_U(n), r_G = G;
  be.scale(r_G.data(), n, grad_scale);
  be.muon_momentum(r_M.data(), r_U.data(), r_G.data(), n, mu, nesterov, nullptr);
  DeviceBuffer<float> d_M(M0), d_G(G);
  DeviceBuffer<TU> d_U(n);
  for (const Schedule& s : optimizer_schedules()) {
    ScopedSchedule scope(s);
    INFO("muon_momentum nesterov " << nesterov << ", schedule " << s.name());
    d_M.upload(M0);
    d_U.poison();
    mk::muon_momentum(d_M.ptr, d_U.ptr, d_G.ptr, grad_scale, n, mu, nesterov, nullptr, nullptr);
    const auto M = d_M.download();
    const auto U = to_float(d_U.download());
    REQUIRE_FALSE(has_nan(M));
    REQUIRE_FALSE(has_nan(U));
    const double eM = rel_error(M, r_M), eU = rel_error(U, r_U);
    CHECK(eM <= 1e-5);
    CHECK(eU <= tol_of<TU>());
    record(eM, false);
    record(eU, !std::is_same_v<TU, float>);
  }
}

template <typename TW, typename TO>
void check_muon_update(size_t n, unsigned seed, bool with_copy) {
  constexpr bool kBf16W = std::is_same_v<TW, bf16>;
  std::mt19937 rng(seed);
  const auto w_s = to_storage<TW>(random_floats(n, rng, 0.05f));
  const auto o_s = to_storage<TO>(random_floats(n, rng, 0.03f));
  const auto w0 = to_float(w_s), O = to_float(o_s);
  const float lr = 0.02f, s = 0.2f * std::sqrt(96.0f), wd = 0.1f;
  moetrain::CpuBackend<float> be;
  std::vector<float> r_w = w0;
  double r_sq = 0;
  be.muon_update(r_w.data(), O.data(), n, lr, s, wd, nullptr, &r_sq);
  DeviceBuffer<TW> d_w(w_s);
  DeviceBuffer<TO> d_O(o_s);
  DeviceBuffer<bf16> d_copy(n);
  DeviceBuffer<double> d_ws(mk::optimizer_workspace_elems()), d_sq(1);
  double first_sq = -1;
  for (const Schedule& sch : optimizer_schedules()) {
    ScopedSchedule scope(sch);
    INFO("muon_update W " << (kBf16W ? "bf16" : "fp32") << " O "
                          << (std::is_same_v<TO, float> ? "fp32" : "bf16") << ", schedule "
                          << sch.name());
    d_w.upload(w_s);
    d_copy.poison();
    d_sq.poison();
    mk::muon_update(d_w.ptr, with_copy ? d_copy.ptr : nullptr, d_O.ptr, n, lr, s, wd, 99, 0,
                    nullptr, d_ws.ptr, d_sq.ptr, false, nullptr);
    const auto w = to_float(d_w.download());
    const double sq = d_sq.get();
    REQUIRE_FALSE(has_nan(w));
    const double ew = rel_error(w, r_w), esq = rel_error(sq, r_sq);
    INFO("errors: w " << ew << " sumsq " << esq);
    CHECK(ew <= tol_of<TW>());
    CHECK(esq <= 1e-5);
    record(ew, kBf16W);
    record(esq, false);
    if (with_copy) {
      const auto copy = d_copy.download();
      CHECK(count_not_neighbour(copy, w) == 0);
    }
    if (first_sq < 0) first_sq = sq;
    CHECK(std::memcmp(&first_sq, &sq, sizeof sq) == 0);
  }
}

template <typename TIn, typename TOut>
void check_frobenius(int batch, size_t elems, unsigned seed, bool in_place, double norm_scale) {
  std::mt19937 rng(seed);
  std::vector<float> x = random_floats(size_t(batch) * elems, rng, 0.7f);
  for (size_t i = 0; i < elems; ++i) x[i] *= 30.0f;  // matrices of different norms
  const auto in_s = to_storage<TIn>(x);
  const auto xin = to_float(in_s);
  moetrain::CpuBackend<float> be;
  std::vector<float> ref = xin;
  be.frobenius_normalize(ref.data(), batch, elems, norm_scale, 1e-7);
  DeviceBuffer<TIn> d_in(in_s);
  DeviceBuffer<TOut> d_out(size_t(batch) * elems);
  DeviceBuffer<double> d_ws(mk::frobenius_workspace_elems(batch, elems));
  for (const Schedule& s : optimizer_schedules()) {
    ScopedSchedule scope(s);
    INFO("frobenius batch " << batch << " elems " << elems << " in place " << in_place
                            << ", schedule " << s.name());
    d_ws.poison();
    std::vector<float> out;
    if constexpr (std::is_same_v<TIn, TOut>) {
      if (in_place) {
        d_in.upload(in_s);
        mk::frobenius_normalize(d_in.ptr, d_in.ptr, batch, elems, norm_scale, 1e-7, d_ws.ptr,
                                nullptr);
        out = to_float(d_in.download());
      }
    }
    if (!in_place) {
      d_out.poison();
      mk::frobenius_normalize(d_out.ptr, d_in.ptr, batch, elems, norm_scale, 1e-7, d_ws.ptr,
                              nullptr);
      out = to_float(d_out.download());
    }
    REQUIRE_FALSE(has_nan(out));
    const double e = rel_error(out, ref);
    CHECK(e <= tol_of<TOut>());
    record(e, !std::is_same_v<TOut, float>);
  }
}

template <typename TW>
void check_scale_row_blocks(unsigned seed, bool with_copy) {
  constexpr bool kBf16W = std::is_same_v<TW, bf16>;
  const int heads = 5, head_dim = 6, d_model = 43;
  const size_t block = size_t(head_dim) * d_model, n = block * heads;
  std::mt19937 rng(seed);
  const auto w_s = to_storage<TW>(random_floats(n, rng, 0.05f));
  const auto w0 = to_float(w_s);
  const std::vector<float> factors{1.0f, 0.5f, 0.8123f, 1.0f, 0.0371f};
  moetrain::CpuBackend<float> be;
  std::vector<float> ref = w0;
  for (int h = 0; h < heads; ++h)
    if (factors[h] != 1.0f) be.scale(ref.data() + size_t(h) * block, block, factors[h]);
  const std::vector<bf16> copy0(n,
                                mk::bf16_from_bits(0x3f80));  // 1.0: must stay in unclipped heads
  DeviceBuffer<TW> d_w(w_s);
  DeviceBuffer<bf16> d_copy(copy0);
  DeviceBuffer<float> d_f(factors);
  for (const Schedule& s : optimizer_schedules()) {
    ScopedSchedule scope(s);
    INFO("scale_row_blocks " << (kBf16W ? "bf16" : "fp32") << ", schedule " << s.name());
    d_w.upload(w_s);
    d_copy.upload(copy0);
    mk::scale_row_blocks(d_w.ptr, with_copy ? d_copy.ptr : nullptr, heads, block, d_f.ptr, nullptr);
    const auto w = to_float(d_w.download());
    REQUIRE_FALSE(has_nan(w));
    const double e = rel_error(w, ref);
    CHECK(e <= tol_of<TW>());
    record(e, kBf16W);
    for (int h : {0, 3})  // unclipped heads: bit for bit untouched
      CHECK(std::memcmp(w.data() + h * block, w0.data() + h * block, block * sizeof(float)) == 0);
    if (with_copy) {
      const auto copy = d_copy.download();
      size_t bad = 0;
      for (size_t i = 0; i < n; ++i) {
        const int h = int(i / block);
        const uint16_t want = factors[h] == 1.0f ? 0x3f80 : mk::bf16_bits(mk::float_to_bf16(w[i]));
        if (mk::bf16_bits(copy[i]) != want) ++bad;
      }
      CHECK(bad == 0);
    }
  }
}

// ---- the step's verdict ---------------------------------------------------------------------
// Every rank's [sum of squares, loss sums...] -> the gate, on the device and on the CPU backend.
void check_step_gate(const std::vector<double>& rank_sums, int world, int per_rank,
                     double max_norm) {
  moetrain::CpuBackend<float> be;
  std::vector<double> ref(3, -1.0);
  be.step_gate(ref.data(), rank_sums.data(), world, per_rank, max_norm);
  DeviceBuffer<double> d_sums(rank_sums), d_gate(3);
  for (const Schedule& s : optimizer_schedules()) {
    ScopedSchedule scope(s);
    d_gate.poison();
    mk::step_gate(d_gate.ptr, d_sums.ptr, world, per_rank, max_norm, nullptr);
    const auto gate = d_gate.download();
    INFO("world " << world << " per rank " << per_rank << " max_norm " << max_norm << ", schedule "
                  << s.name());
    CHECK(std::memcmp(gate.data(), ref.data(), 3 * sizeof(double)) == 0);
  }
}

}  // namespace

TEST_CASE("optimizer kernels: the step gate sums ranks in order and skips on non-finite values",
          "[simt][kernels]") {
  const double inf = std::numeric_limits<double>::infinity(), nan = std::nan("");
  // Two ranks, two loss sums each: norm sqrt(4 + 5) = 3.
  const std::vector<double> fine = {4.0, 1.5, 2.5, 5.0, 0.5, 7.0};
  moetrain::CpuBackend<float> be;
  std::vector<double> gate(3);
  be.step_gate(gate.data(), fine.data(), 2, 3, 1.0);
  CHECK(gate[moetrain::StepGate::kGradSumSquares] == 9.0);
  CHECK(gate[moetrain::StepGate::kSkip] == 0.0);
  CHECK(gate[moetrain::StepGate::kClipCoef] == 1.0 / (3.0 + 1e-6));
  be.step_gate(gate.data(), fine.data(), 2, 3, 5.0);  // norm below max_norm: no clipping
  CHECK(gate[moetrain::StepGate::kClipCoef] == 1.0);
  be.step_gate(gate.data(), fine.data(), 2, 3, 0.0);  // clipping off
  CHECK(gate[moetrain::StepGate::kClipCoef] == 1.0);
  for (const double bad : {inf, -inf, nan})
    for (std::size_t at : {std::size_t(0), std::size_t(2), std::size_t(4)}) {
      std::vector<double> v = fine;
      v[at] = bad;
      be.step_gate(gate.data(), v.data(), 2, 3, 1.0);
      INFO("bad value at " << at);
      CHECK(gate[moetrain::StepGate::kSkip] == 1.0);
      CHECK(gate[moetrain::StepGate::kClipCoef] == 1.0);  // a skipped step scales nothing
      check_step_gate(v, 2, 3, 1.0);
    }
  check_step_gate(fine, 2, 3, 1.0);
  check_step_gate(fine, 2, 3, 5.0);
  check_step_gate(fine, 3, 2, 0.5);
  check_step_gate({1e-3}, 1, 1, 1.0);
  CHECK_THROWS_AS(mk::step_gate(nullptr, nullptr, 0, 1, 1.0, nullptr), std::invalid_argument);
}

TEST_CASE(
    "optimizer kernels: a skipped step writes nothing, and scale_by scales by a device factor",
    "[simt][kernels]") {
  const size_t n = 3001;
  std::mt19937 rng(31);
  const auto w0 = random_floats(n, rng, 0.05f), g = random_floats(n, rng, 0.01f),
             m0 = random_floats(n, rng, 0.003f), O = random_floats(n, rng, 0.03f);
  std::vector<float> v0 = random_floats(n, rng, 1e-2f);
  for (auto& x : v0) x = x * x;
  const std::vector<double> skip_gate = {1.0, 1.0, 1.0}, run_gate = {1.0, 1.0, 0.0};
  DeviceBuffer<double> d_skip(skip_gate), d_run(run_gate), d_ws(mk::optimizer_workspace_elems()),
      d_sq(1);
  DeviceBuffer<float> d_w(w0), d_g(g), d_m(m0), d_v(v0), d_O(O), d_U(n);
  const double* skip = d_skip.ptr + mk::kGateSkip;
  for (const Schedule& s : optimizer_schedules()) {
    ScopedSchedule scope(s);
    INFO("schedule " << s.name());
    d_sq.upload(std::vector<double>{2.5});
    mk::adamw_update(d_w.ptr, static_cast<bf16*>(nullptr), d_g.ptr, 1.0f, d_m.ptr, d_v.ptr, n,
                     mk::adamw_params(1e-2, 0.9, 0.95, 1e-8, 0.1, 3), 1, 0, skip, d_ws.ptr,
                     d_sq.ptr, true, nullptr);
    mk::muon_update(d_w.ptr, static_cast<bf16*>(nullptr), d_O.ptr, n, 0.02f, 1.0f, 0.1f, 1, 0, skip,
                    d_ws.ptr, d_sq.ptr, true, nullptr);
    const std::vector<float> U0(n, 7.0f);
    d_U.upload(U0);
    mk::muon_momentum(d_m.ptr, d_U.ptr, d_g.ptr, 1.0f, n, 0.95f, true, skip, nullptr);
    CHECK(std::memcmp(d_w.download().data(), w0.data(), n * sizeof(float)) == 0);
    CHECK(std::memcmp(d_m.download().data(), m0.data(), n * sizeof(float)) == 0);
    CHECK(std::memcmp(d_v.download().data(), v0.data(), n * sizeof(float)) == 0);
    CHECK(std::memcmp(d_U.download().data(), U0.data(), n * sizeof(float)) == 0);
    CHECK(d_sq.get() == 2.5);  // the sums gain exactly nothing
    // Not skipped (skip = 0): the update runs.
    mk::muon_update(d_w.ptr, static_cast<bf16*>(nullptr), d_O.ptr, n, 0.02f, 1.0f, 0.1f, 1, 0,
                    d_run.ptr + mk::kGateSkip, d_ws.ptr, d_sq.ptr, true, nullptr);
    CHECK(std::memcmp(d_w.download().data(), w0.data(), n * sizeof(float)) != 0);
    CHECK(d_sq.get() > 2.5);
    d_w.upload(w0);
  }
  // The CPU backend's ops under the same gate.
  moetrain::CpuBackend<float> be;
  std::vector<float> w = w0, m = m0, v = v0, U(n, 7.0f);
  double sq = 2.5;
  be.adamw_update(w.data(), g.data(), m.data(), v.data(), n, 1e-2, 0.9, 0.95, 1e-8, 0.1, 3,
                  skip_gate.data(), &sq);
  be.muon_update(w.data(), O.data(), n, 0.02, 1.0, 0.1, skip_gate.data(), &sq);
  be.muon_momentum(m.data(), U.data(), g.data(), n, 0.95, true, skip_gate.data());
  CHECK(w == w0);
  CHECK(m == m0);
  CHECK(v == v0);
  CHECK(U == std::vector<float>(n, 7.0f));
  CHECK(sq == 2.5);

  // scale_by: a factor of 1 leaves x untouched; another equals the CPU backend's scale_by.
  for (const double f : {1.0, 0.3125, 1.0 / 3.0}) {
    std::vector<float> ref = w0;
    be.scale_by(ref.data(), n, &f);
    DeviceBuffer<double> d_f(std::vector<double>{f});
    for (const Schedule& s : optimizer_schedules()) {
      ScopedSchedule scope(s);
      INFO("factor " << f << ", schedule " << s.name());
      d_w.upload(w0);
      mk::scale_by(d_w.ptr, n, d_f.ptr, nullptr);
      CHECK(std::memcmp(d_w.download().data(), ref.data(), n * sizeof(float)) == 0);
    }
  }
}

TEST_CASE("optimizer kernels: QK-clip factors from the device S_max match the CPU backend",
          "[simt][kernels]") {
  // 3 layers, 6 query heads in 2 kv groups of 3, 2 micro-batch slots; q and k matrices of
  // layers 0 and 2 (as one rank might own them).
  const int L = 3, H = 6, Hkv = 2, slots = 2;
  const std::vector<std::int32_t> mats = {0, 1, 0, 0, 2, 1, 2, 0};
  const moetrain::QkClipShape shape{4, slots, L, H, Hkv, H, 10.0, 0.5};
  std::mt19937 rng(41);
  std::uniform_real_distribution<float> u(2.0f, 14.0f);
  std::vector<float> smax(std::size_t(slots) * L * H);
  for (float& x : smax) x = u(rng);
  smax[5] = 40.0f;  // a clear outlier: slot 0, layer 0, head 5
  moetrain::CpuBackend<float> be;
  std::vector<float> ref(std::size_t(4) * H, -1.0f);
  double ref_clipped = 0.5;
  be.qk_clip_factors(ref.data(), &ref_clipped, smax.data(), mats.data(), shape, nullptr);
  // Independent of the op: head 5 of layer 0 is over tau in slot 0, so its q factor is
  // (tau / 40)^alpha and its kv group's (group 1) k factor at most (tau / 40)^(1 - alpha).
  CHECK(ref[5] == Approx(std::pow(10.0 / 40.0, 0.5)));
  CHECK(ref[std::size_t(H) + 1] <= float(std::pow(10.0 / 40.0, 0.5)) * 1.000001f);
  CHECK(ref_clipped > 1.5);
  DeviceBuffer<float> d_smax(smax), d_f(ref.size());
  DeviceBuffer<std::int32_t> d_mats(mats);
  DeviceBuffer<double> d_clipped(1), d_skip(std::vector<double>{0.0, 1.0, 1.0});
  for (const Schedule& s : optimizer_schedules()) {
    ScopedSchedule scope(s);
    INFO("schedule " << s.name());
    d_f.poison();
    d_clipped.upload(std::vector<double>{0.5});
    const mk::QkClipDims dims{4, slots, L, H, Hkv, H, 10.0, 0.5};
    mk::qk_clip_factors(d_f.ptr, d_clipped.ptr, d_smax.ptr, d_mats.ptr, dims, nullptr, nullptr);
    const auto f = d_f.download();
    for (std::size_t i = 0; i < f.size(); ++i) {
      INFO("factor " << i);
      CHECK(f[i] == Approx(ref[i]).epsilon(1e-6));
      CHECK((f[i] == 1.0f) == (ref[i] == 1.0f));  // untouched blocks stay exactly 1
    }
    CHECK(d_clipped.get() == ref_clipped);
    // Skipped: every factor 1, nothing counted.
    d_f.poison();
    mk::qk_clip_factors(d_f.ptr, d_clipped.ptr, d_smax.ptr, d_mats.ptr, dims,
                        d_skip.ptr + mk::kGateSkip, nullptr);
    for (float x : d_f.download()) CHECK(x == 1.0f);
    CHECK(d_clipped.get() == ref_clipped);
  }
}

TEST_CASE("optimizer kernels: AdamW matches the CPU backend", "[simt][kernels]") {
  check_adamw<float>(10007, 1, true, 1.0f);
  check_adamw<float>(333, 2, false, 0.3125f);  // a clip coefficient / world averaging folded in
  check_adamw<bf16>(4099, 3, false, 0.77f);
}

TEST_CASE("optimizer kernels: sum of squares (grad norm) is exact and deterministic",
          "[simt][kernels]") {
  check_sum_squares<float>(1, 4);
  check_sum_squares<float>(100003, 5);
  check_sum_squares<bf16>(12345, 6);
}

TEST_CASE("optimizer kernels: Muon momentum, update and Frobenius normalisation",
          "[simt][kernels]") {
  check_muon_momentum<float>(5003, 7, true, 1.0f);
  check_muon_momentum<float>(777, 8, false, 0.4f);
  check_muon_momentum<bf16>(5003, 9, true, 0.93f);
  check_muon_update<float, float>(6007, 10, true);
  check_muon_update<float, bf16>(3001, 11, false);
  check_muon_update<bf16, bf16>(3001, 12, false);
  check_frobenius<float, float>(3, 9001, 13, false, 1.0);
  check_frobenius<float, float>(4, 555, 14, true, 1.02);   // Polar Express's normalisation
  check_frobenius<float, bf16>(2, 70001, 15, false, 1.0);  // more than one chunk per matrix
  check_frobenius<bf16, bf16>(3, 1000, 16, true, 1.02);
}

TEST_CASE("optimizer kernels: QK-clip row scaling", "[simt][kernels]") {
  check_scale_row_blocks<float>(17, true);
  check_scale_row_blocks<float>(18, false);
  check_scale_row_blocks<bf16>(19, false);
  if (std::getenv("MOETRAIN_KERNEL_ERRORS"))
    std::printf("optimizer kernels: max relative error fp32 %.3g, bf16 %.3g\n", g_max_err_f32,
                g_max_err_bf16);
}

TEST_CASE("optimizer kernels: stochastic rounding of weight copies is unbiased",
          "[simt][kernels]") {
  // lr = 0: the weights stay exactly x and every copy is one stochastic rounding of x.
  const size_t n = 20000;
  for (const float frac : {0.3f, 0.9f}) {
    for (const float sign : {1.0f, -1.0f}) {
      const float ulp = std::ldexp(1.0f, -7);  // bf16 spacing in [1, 2)
      const float x = sign * (1.0f + 5 * ulp + frac * ulp);
      uint16_t lo, hi;
      bf16_neighbours(x, lo, hi);
      std::vector<float> w0(n, x), zeros(n, 0.0f);
      DeviceBuffer<float> d_w(w0), d_g(zeros), d_m(zeros), d_v(zeros), d_O(zeros);
      DeviceBuffer<bf16> d_copy(n);
      DeviceBuffer<double> d_ws(mk::optimizer_workspace_elems());
      for (int which = 0; which < 2; ++which) {
        INFO("x " << x << (which == 0 ? " adamw" : " muon_update"));
        d_copy.poison();
        if (which == 0)
          mk::adamw_update(d_w.ptr, d_copy.ptr, d_g.ptr, 1.0f, d_m.ptr, d_v.ptr, n,
                           mk::adamw_params(0.0, 0.9, 0.95, 1e-8, 0.1, 1), 42 + which, 1000,
                           nullptr, d_ws.ptr, nullptr, false, nullptr);
        else
          mk::muon_update(d_w.ptr, d_copy.ptr, d_O.ptr, n, 0.0f, 1.0f, 0.1f, 4242, 0, nullptr,
                          d_ws.ptr, nullptr, false, nullptr);
        const auto w = d_w.download();
        const auto copy = d_copy.download();
        REQUIRE(std::memcmp(w.data(), w0.data(), n * sizeof(float)) == 0);
        size_t ups = 0, others = 0;
        double mean = 0;
        for (const bf16 c : copy) {
          const uint16_t b = mk::bf16_bits(c);
          if (b == hi)
            ++ups;
          else if (b != lo)
            ++others;
          mean += mk::bf16_to_float(c);
        }
        mean /= double(n);
        CHECK(others == 0);
        const double se = ulp * std::sqrt(double(frac) * (1 - frac) / double(n));
        INFO("mean " << mean << " expected " << x << " standard error " << se << " round-ups "
                     << ups);
        CHECK(std::fabs(mean - double(x)) <= 4 * se);
        CHECK(std::fabs(double(ups) / n - frac) <= 4 * std::sqrt(double(frac) * (1 - frac) / n));
      }
    }
  }
  // bf16 weights that are already bf16 values do not drift under a zero update.
  std::mt19937 rng(20);
  const auto w_s = to_storage<bf16>(random_floats(3000, rng));
  const std::vector<float> zeros(3000, 0.0f);
  DeviceBuffer<bf16> d_w(w_s);
  DeviceBuffer<float> d_O(zeros);
  DeviceBuffer<double> d_ws(mk::optimizer_workspace_elems());
  mk::muon_update(d_w.ptr, static_cast<bf16*>(nullptr), d_O.ptr, 3000, 0.0f, 1.0f, 0.0f, 5, 0,
                  nullptr, d_ws.ptr, nullptr, false, nullptr);
  const auto w = d_w.download();
  CHECK(std::memcmp(w.data(), w_s.data(), 3000 * sizeof(bf16)) == 0);
}
