// The float backend's bf16 mode stores activations in bf16 (activation_storage BF16) and does each
// op's arithmetic in fp32: every stored value is the op's exact result rounded once. Each op here
// runs on bf16-valued inputs and is checked against the double backend on the same values: an
// output must lie within half a bf16 ulp of the double result (plus the fp32 math's own error),
// which a second rounding (a sum kept in bf16 between slots, say) would break.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <vector>

#include "backend/cpu/bf16.hpp"
#include "gradcheck.hpp"
#include "moetrain/cpu_backend.hpp"

using moetrain::CDevPtr;
using moetrain::CpuBackend;
using moetrain::CpuBackendOptions;
using moetrain::DevPtr;
using moetrain::Storage;
using moetrain::cpu::bf16;
using moetrain::test::random_vector;

namespace {

std::vector<bf16> rounded(const std::vector<double>& x) {
  return {x.begin(), x.end()};
}
std::vector<double> widened(const std::vector<bf16>& x) {
  return {x.begin(), x.end()};
}
std::vector<float> narrowed(const std::vector<double>& x) {
  return {x.begin(), x.end()};
}
DevPtr act(std::vector<bf16>& v) {
  return {v.data(), Storage::BF16};
}
CDevPtr act(const std::vector<bf16>& v) {
  return {v.data(), Storage::BF16};
}

// Elements of `got` farther from `want` than one rounding: half a bf16 ulp of the exact value, plus
// `slack` (relative to the largest |want|) for the fp32 arithmetic before the rounding.
int not_rounded_once(const std::vector<bf16>& got, const std::vector<double>& want,
                     double slack = 1e-6) {
  REQUIRE(got.size() == want.size());
  double scale = 0;
  for (double w : want) scale = std::max(scale, std::abs(w));
  int bad = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double w = want[i];
    const double half_ulp = w == 0 ? 0 : std::ldexp(1.0, std::ilogb(w) - 8);
    if (!(std::abs(double(float(got[i])) - w) <= half_ulp * (1 + 1e-6) + slack * scale)) ++bad;
  }
  return bad;
}

}  // namespace

TEST_CASE("bf16 activations: the float backend in bf16 mode stores bf16", "[ops][bf16]") {
  CHECK(CpuBackend<float>(CpuBackendOptions{true}).activation_storage() == Storage::BF16);
  CHECK(CpuBackend<float>().activation_storage() == Storage::F32);
  // An fp32 buffer where the op expects bf16 activations is refused, not read as bf16.
  CpuBackend<float> be(CpuBackendOptions{true});
  std::vector<float> x(8), y(8);
  CHECK_THROWS_WITH(be.add_inplace(x.data(), y.data(), 8),
                    Catch::Contains("f32 buffer used as bf16 activations"));
}

TEST_CASE("bf16 activations: elementwise ops round their fp32 result once", "[ops][bf16]") {
  CpuBackend<float> be(CpuBackendOptions{true});
  CpuBackend<double> ref;
  const int n = 37, d = 48;
  const std::size_t nd = std::size_t(n) * d;

  SECTION("add_inplace") {
    auto x = rounded(random_vector(nd, 1)), y = rounded(random_vector(nd, 2));
    auto xr = widened(x);
    const auto yr = widened(y);
    be.add_inplace(act(x), act(y), nd);
    ref.add_inplace(xr.data(), yr.data(), nd);
    CHECK(not_rounded_once(x, xr) == 0);
  }
  SECTION("rmsnorm forward and backward (dx accumulated, then rounded once)") {
    const auto x = rounded(random_vector(nd, 3, 2.0)), dy = rounded(random_vector(nd, 4));
    const auto gain = random_vector(std::size_t(d), 5);
    const auto xr = widened(x), dyr = widened(dy);
    std::vector<bf16> y(nd), dx = rounded(random_vector(nd, 6));
    std::vector<double> yr(nd), rstd_r(static_cast<std::size_t>(n)),
        dxr = widened(dx), dg_r(static_cast<std::size_t>(d));
    std::vector<float> rstd(static_cast<std::size_t>(n)), dg(static_cast<std::size_t>(d)),
        gain_f = narrowed(gain);
    const std::vector<double> gain_r(gain_f.begin(), gain_f.end());
    be.rmsnorm_forward(act(y), rstd.data(), act(x), gain_f.data(), n, d, 1e-6);
    ref.rmsnorm_forward(yr.data(), rstd_r.data(), xr.data(), gain_r.data(), n, d, 1e-6);
    CHECK(not_rounded_once(y, yr) == 0);
    be.rmsnorm_backward(act(dx), dg.data(), act(dy), act(x), gain_f.data(), rstd.data(), n, d);
    ref.rmsnorm_backward(dxr.data(), dg_r.data(), dyr.data(), xr.data(), gain_r.data(),
                         rstd_r.data(), n, d);
    CHECK(not_rounded_once(dx, dxr, 1e-5) == 0);
  }
  SECTION("rope in place on a strided buffer") {
    const int seq = 12, heads = 3, hd = 8, ld = heads * hd + 5, rows = 24;
    auto x = rounded(random_vector(std::size_t(rows) * ld, 7));
    auto xr = widened(x);
    std::vector<float> cs(std::size_t(seq) * hd / 2), sn(cs.size());
    for (std::size_t i = 0; i < cs.size(); ++i)
      cs[i] = float(std::cos(0.3 * double(i))), sn[i] = float(std::sin(0.3 * double(i)));
    const std::vector<double> csr(cs.begin(), cs.end()), snr(sn.begin(), sn.end());
    be.rope_forward(act(x), ld, rows, seq, heads, hd, cs.data(), sn.data());
    ref.rope_forward(xr.data(), ld, rows, seq, heads, hd, csr.data(), snr.data());
    CHECK(not_rounded_once(x, xr) == 0);
    // The columns past the heads are not touched.
    CHECK(float(x[std::size_t(ld) - 1]) == float(xr[std::size_t(ld) - 1]));
  }
  SECTION("swiglu forward and backward") {
    const int rows = 19, ff = 40;
    const auto h = rounded(random_vector(std::size_t(rows) * 2 * ff, 8, 3.0));
    const auto g = rounded(random_vector(std::size_t(rows) * ff, 9));
    const auto hr = widened(h), gr = widened(g);
    std::vector<bf16> out(std::size_t(rows) * ff), dh(h.size());
    std::vector<double> outr(out.size()), dhr(h.size());
    be.swiglu_forward(act(out), act(h), rows, ff);
    ref.swiglu_forward(outr.data(), hr.data(), rows, ff);
    CHECK(not_rounded_once(out, outr) == 0);
    be.swiglu_backward(act(dh), act(g), act(h), rows, ff);
    ref.swiglu_backward(dhr.data(), gr.data(), hr.data(), rows, ff);
    CHECK(not_rounded_once(dh, dhr) == 0);
  }
  SECTION("cross-entropy: fp32 losses, bf16 dlogits over the logits") {
    const int vocab = 300;
    auto logits = rounded(random_vector(std::size_t(n) * vocab, 10, 4.0));
    auto lr = widened(logits);
    std::vector<std::int32_t> tgt(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) tgt[std::size_t(i)] = (i * 37) % vocab;
    tgt[4] = -1;  // padding
    std::vector<float> loss(static_cast<std::size_t>(n));
    std::vector<double> loss_r(static_cast<std::size_t>(n));
    double sum = 0, sum_r = 0;
    const float scale = 0.25f;
    const double scale_r = scale;
    be.cross_entropy(loss.data(), &sum, act(logits), tgt.data(), n, vocab, &scale);
    ref.cross_entropy(loss_r.data(), &sum_r, lr.data(), tgt.data(), n, vocab, &scale_r);
    for (int i = 0; i < n; ++i)
      CHECK(loss[std::size_t(i)] == Approx(loss_r[std::size_t(i)]).epsilon(1e-5).margin(1e-6));
    CHECK(sum == Approx(sum_r).epsilon(1e-5));
    CHECK(not_rounded_once(logits, lr) == 0);
  }
  SECTION("MoE combine and the permutation's backward sum k slots before one rounding") {
    const int tokens = 11, k = 3, rows = tokens * k, dd = 16;
    const auto yg = rounded(random_vector(std::size_t(rows) * dd, 11));
    const auto ygr = widened(yg);
    std::vector<std::int32_t> pos(static_cast<std::size_t>(rows));
    for (int a = 0; a < rows; ++a) pos[std::size_t(a)] = (a * 7) % rows;  // a permutation
    const auto gates = random_vector(std::size_t(rows), 12);
    const std::vector<float> gates_f = narrowed(gates);
    const std::vector<double> gates_r(gates_f.begin(), gates_f.end());
    std::vector<bf16> y(std::size_t(tokens) * dd);
    std::vector<double> yr(y.size());
    be.moe_unpermute(act(y), act(yg), gates_f.data(), pos.data(), tokens, dd, k);
    ref.moe_unpermute(yr.data(), ygr.data(), gates_r.data(), pos.data(), tokens, dd, k);
    CHECK(not_rounded_once(y, yr) == 0);
    auto dx = rounded(random_vector(std::size_t(tokens) * dd, 13));  // summed into
    auto dxr = widened(dx);
    be.moe_permute_backward(act(dx), act(yg), pos.data(), tokens, dd, k);
    ref.moe_permute_backward(dxr.data(), ygr.data(), pos.data(), tokens, dd, k);
    CHECK(not_rounded_once(dx, dxr) == 0);
  }
}

// GEMMs read bf16 activations in place and write a bf16 C from the fp32 sum (with beta, the sum
// includes beta * C); fp32 operands in the same product are rounded to bf16 as before.
TEST_CASE("bf16 activations: a GEMM with bf16 operands and C rounds its fp32 sum once",
          "[ops][bf16]") {
  CpuBackend<float> be(CpuBackendOptions{true});
  const int M = 23, N = 17, K = 40;
  for (const float beta : {0.0f, 1.0f}) {
    INFO("beta " << beta);
    const auto a = rounded(random_vector(std::size_t(M) * K, 20));
    const auto b = rounded(random_vector(std::size_t(K) * N, 21));
    auto c = rounded(random_vector(std::size_t(M) * N, 22));
    std::vector<double> want(c.size());
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) {
        double s = 0;
        for (int p = 0; p < K; ++p)
          s += double(float(a[std::size_t(i) * K + p])) * double(float(b[std::size_t(p) * N + j]));
        want[std::size_t(i) * N + j] = 0.5 * s + beta * double(float(c[std::size_t(i) * N + j]));
      }
    be.gemm(false, false, M, N, K, 0.5f, act(a), K, act(b), N, beta, act(c), N);
    CHECK(not_rounded_once(c, want, 1e-6) == 0);
  }
}
