// Finite-difference gradient checks, in double, of every CPU backend op: each op's backward must
// be the derivative of its forward. The scalar checked is sum(out * R) for a random R (plus the
// op's own losses where it has them).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>

#include "backend/cpu/bf16.hpp"
#include "gradcheck.hpp"
#include "moetrain/cpu_backend.hpp"

using namespace moetrain;
using namespace moetrain::test;

namespace {
constexpr double kTol = 1e-6;
}

TEST_CASE("embedding backward is the derivative of the lookup (repeated tokens)", "[grad][ops]") {
  CpuBackend<double> be;
  const int n = 9, d = 5, V = 4;
  std::vector<std::int32_t> tok = {0, 3, 3, 1, 0, 3, 2, 2, 3};
  auto table = random_vector(std::size_t(V) * d, 1);
  auto R = random_vector(std::size_t(n) * d, 2);
  std::vector<double> out(std::size_t(n) * d), dtable(table.size(), 0.0);
  auto loss = [&] {
    be.embedding_forward(out.data(), tok.data(), table.data(), n, d);
    return dot(out, R);
  };
  be.embedding_backward(dtable.data(), R.data(), tok.data(), n, d);
  CHECK(fd_relative_error(loss, table.data(), dtable, all_indices(table.size())) < kTol);
}

TEST_CASE("rmsnorm backward matches finite differences", "[grad][ops]") {
  CpuBackend<double> be;
  const int n = 6, d = 7;
  auto x = random_vector(std::size_t(n) * d, 3);
  auto g = random_vector(std::size_t(d), 4);
  auto R = random_vector(std::size_t(n) * d, 5);
  std::vector<double> out(x.size()), rstd(static_cast<std::size_t>(n));
  auto loss = [&] {
    be.rmsnorm_forward(out.data(), rstd.data(), x.data(), g.data(), n, d, 1e-6);
    return dot(out, R);
  };
  loss();
  std::vector<double> dx(x.size(), 0.0), dg(g.size(), 0.0);
  be.rmsnorm_backward(dx.data(), dg.data(), R.data(), x.data(), g.data(), rstd.data(), n, d);
  CHECK(fd_relative_error(loss, x.data(), dx, all_indices(x.size())) < kTol);
  CHECK(fd_relative_error(loss, g.data(), dg, all_indices(g.size())) < kTol);
}

TEST_CASE("rope backward is the transpose of the rotation", "[grad][ops]") {
  CpuBackend<double> be;
  const int seq = 5, rows = 10, heads = 3, hd = 6, ld = heads * hd + 4;  // ld > heads*hd: strided
  std::vector<double> cs(std::size_t(seq) * hd / 2), sn(cs.size());
  for (int p = 0; p < seq; ++p)
    for (int i = 0; i < hd / 2; ++i) {
      const double a = p * std::pow(10000.0, -2.0 * i / hd);
      cs[std::size_t(p * hd / 2 + i)] = std::cos(a);
      sn[std::size_t(p * hd / 2 + i)] = std::sin(a);
    }
  auto x = random_vector(std::size_t(rows) * ld, 6);
  auto R = random_vector(x.size(), 7);
  auto loss = [&] {
    auto y = x;
    be.rope_forward(y.data(), ld, rows, seq, heads, hd, cs.data(), sn.data());
    return dot(y, R);
  };
  auto dx = R;
  be.rope_backward(dx.data(), ld, rows, seq, heads, hd, cs.data(), sn.data());
  CHECK(fd_relative_error(loss, x.data(), dx, all_indices(x.size())) < kTol);
  // The rotation preserves norms per pair, so it is orthogonal: backward(forward(x)) == x.
  auto y = x;
  be.rope_forward(y.data(), ld, rows, seq, heads, hd, cs.data(), sn.data());
  be.rope_backward(y.data(), ld, rows, seq, heads, hd, cs.data(), sn.data());
  for (std::size_t i = 0; i < x.size(); ++i) CHECK(y[i] == Approx(x[i]).margin(1e-12));
}

namespace {
// Relative error of attention_backward against finite differences of <out, R> at every
// stride-th entry of a random qkv.
double attention_fd_error(const AttentionShape& s, std::uint64_t qkv_seed, std::uint64_t r_seed,
                          std::size_t stride) {
  CpuBackend<double> be;
  auto qkv = random_vector(std::size_t(s.rows()) * s.qkv_width(), qkv_seed);
  auto R = random_vector(std::size_t(s.rows()) * s.out_width(), r_seed);
  std::vector<double> out(R.size()), saved(be.attention_saved_elems(s)),
      smax(std::size_t(s.n_heads));
  auto loss = [&] {
    be.attention_forward(out.data(), saved.data(), smax.data(), qkv.data(), s);
    return dot(out, R);
  };
  loss();
  std::vector<double> dqkv(qkv.size(), std::numeric_limits<double>::quiet_NaN());
  be.attention_backward(dqkv.data(), R.data(), qkv.data(), out.data(), saved.data(), s);
  std::vector<std::size_t> idx;
  for (std::size_t i = 0; i < qkv.size(); i += stride) idx.push_back(i);
  return fd_relative_error(loss, qkv.data(), dqkv, idx);
}
}  // namespace

TEST_CASE("attention backward matches finite differences (MHA and GQA)", "[grad][ops]") {
  for (auto [H, Hkv] : {std::pair{2, 2}, std::pair{4, 2}, std::pair{4, 1}}) {
    INFO("H=" << H << " Hkv=" << Hkv);
    CHECK(attention_fd_error(AttentionShape{2, 5, H, Hkv, 4}, 8, 9, 1) < kTol);
  }
}

// The CPU's attention is tiled in 64-row query blocks and 256-key spans: T = 300 has five query
// blocks, the last one partial, and the rows past 256 see two key spans, the second partial, so
// the online softmax's rescaling across spans, the diagonal's masked triangles and the partial
// tiles all enter these checks. Every 13th entry covers all rows' blocks and the q, k and v
// columns of every head (13 and the row width 32 are coprime).
TEST_CASE("attention backward matches finite differences across query and key blocks",
          "[grad][ops]") {
  CHECK(attention_fd_error(AttentionShape{1, 300, 4, 2, 4}, 21, 22, 13) < kTol);
}

TEST_CASE("attention forward equals a materialised causal softmax across blocks", "[ops]") {
  CpuBackend<double> be;
  const AttentionShape s{2, 300, 4, 1, 8};
  const auto qkv = random_vector(std::size_t(s.rows()) * s.qkv_width(), 23, 1.5);
  std::vector<double> out(std::size_t(s.rows()) * s.out_width()),
      saved(be.attention_saved_elems(s)), smax(std::size_t(s.n_heads));
  be.attention_forward(out.data(), saved.data(), smax.data(), qkv.data(), s);
  const int ld = s.qkv_width(), hd = s.head_dim, group = s.n_heads / s.n_kv_heads;
  double worst = 0;
  for (int b = 0; b < s.batch; ++b)
    for (int h = 0; h < s.n_heads; ++h) {
      const int g = h / group;
      for (int i = 0; i < s.seq; ++i) {
        std::vector<double> p(std::size_t(i) + 1);
        double mx = -1e300, sum = 0;
        for (int j = 0; j <= i; ++j) {
          double d = 0;
          for (int c = 0; c < hd; ++c)
            d += qkv[std::size_t((b * s.seq + i) * ld + h * hd + c)] *
                 qkv[std::size_t((b * s.seq + j) * ld + (s.n_heads + g) * hd + c)];
          p[std::size_t(j)] = d / std::sqrt(double(hd));
          mx = std::max(mx, p[std::size_t(j)]);
        }
        for (double& x : p) sum += (x = std::exp(x - mx));
        for (int c = 0; c < hd; ++c) {
          double o = 0;
          for (int j = 0; j <= i; ++j)
            o += p[std::size_t(j)] / sum *
                 qkv[std::size_t((b * s.seq + j) * ld + (s.n_heads + s.n_kv_heads + g) * hd + c)];
          worst = std::max(
              worst, std::abs(o - out[std::size_t((b * s.seq + i) * s.out_width() + h * hd + c)]));
        }
      }
    }
  CHECK(worst < 1e-12);
}

// The float backend's bf16 mode runs attention on bf16 activations with bf16 tile products (each
// tile's P and dS rounded, fp32 accumulation, O and dQKV rounded once): the outputs, S_max and the
// gradients must be the double backend's, on the same bf16-valued inputs, to bf16 accuracy, across
// key spans (T = 300) and with odd T and head_dim (the pair layouts' padding). Errors are relative
// to the largest reference value of each output.
TEST_CASE("attention with bf16 tile products matches the double backend to bf16 accuracy",
          "[ops][bf16]") {
  using moetrain::cpu::bf16;
  const auto to_bf16 = [](const std::vector<double>& x) {
    return std::vector<bf16>(x.begin(), x.end());  // each value rounded to nearest even
  };
  const auto widen = [](const std::vector<bf16>& x) {
    return std::vector<double>(x.begin(), x.end());
  };
  const auto act = [](auto& v) { return moetrain::DevPtr(v.data(), moetrain::Storage::BF16); };
  for (const AttentionShape s : {AttentionShape{2, 300, 4, 2, 8}, AttentionShape{1, 37, 2, 1, 7}}) {
    INFO("T " << s.seq << " hd " << s.head_dim);
    CpuBackend<double> ref_be;
    CpuBackend<float> be(CpuBackendOptions{true});
    auto qkv_b = to_bf16(random_vector(std::size_t(s.rows()) * s.qkv_width(), 31, 1.5));
    auto dout_b = to_bf16(random_vector(std::size_t(s.rows()) * s.out_width(), 32));
    const auto qkv = widen(qkv_b), dout = widen(dout_b);
    std::vector<double> out(dout.size()), saved(ref_be.attention_saved_elems(s)),
        smax(std::size_t(s.n_heads)), dqkv(qkv.size());
    ref_be.attention_forward(out.data(), saved.data(), smax.data(), qkv.data(), s);
    ref_be.attention_backward(dqkv.data(), dout.data(), qkv.data(), out.data(), saved.data(), s);
    REQUIRE(be.activation_storage() == moetrain::Storage::BF16);
    std::vector<bf16> out_b(out.size()), dqkv_b(qkv.size(), bf16(std::nanf("")));
    std::vector<float> saved_f(be.attention_saved_elems(s)), smax_f(smax.size());
    be.attention_forward(act(out_b), saved_f.data(), smax_f.data(), act(qkv_b), s);
    be.attention_backward(act(dqkv_b), act(dout_b), act(qkv_b), act(out_b), saved_f.data(), s);
    const std::vector<float> out_f(out_b.begin(), out_b.end()),
        dqkv_f(dqkv_b.begin(), dqkv_b.end());
    auto rel = [](const std::vector<float>& got, const std::vector<double>& want) {
      double err = 0, scale = 0;
      for (std::size_t i = 0; i < want.size(); ++i) {
        if (!std::isfinite(got[i])) return std::numeric_limits<double>::infinity();
        err = std::max(err, std::abs(double(got[i]) - want[i]));
        scale = std::max(scale, std::abs(want[i]));
      }
      return err / scale;
    };
    const double e_out = rel(out_f, out), e_smax = rel(smax_f, smax), e_grad = rel(dqkv_f, dqkv);
    INFO("out " << e_out << " smax " << e_smax << " dqkv " << e_grad);
    CHECK(e_out < 1.5e-2);  // measured 5e-3 to 7e-3
    CHECK(e_smax < 5e-3);   // 1.1e-3 to 1.2e-3
    CHECK(e_grad < 2e-2);   // 4.6e-3 to 6.8e-3
    // Not the fp32 path by mistake: bf16 operands leave an error fp32 tiles would not.
    CHECK(e_out > 1e-5);
  }
}

TEST_CASE("attention records S_max equal to a brute-force maximum", "[ops][smax]") {
  CpuBackend<float> be;
  for (const AttentionShape s : {AttentionShape{3, 7, 4, 2, 8}, AttentionShape{2, 150, 4, 2, 8}}) {
    auto q64 = random_vector(std::size_t(s.rows()) * s.qkv_width(), 10, 2.0);
    std::vector<float> qkv(q64.begin(), q64.end());
    std::vector<float> out(std::size_t(s.rows()) * s.out_width()),
        saved(be.attention_saved_elems(s)), smax(std::size_t(s.n_heads));
    be.attention_forward(out.data(), saved.data(), smax.data(), qkv.data(), s);
    const int ld = s.qkv_width(), hd = s.head_dim, group = s.n_heads / s.n_kv_heads;
    for (int h = 0; h < s.n_heads; ++h) {
      double best = -1e300;
      for (int b = 0; b < s.batch; ++b)
        for (int i = 0; i < s.seq; ++i)
          for (int j = 0; j <= i; ++j) {
            double dotp = 0;
            for (int c = 0; c < hd; ++c)
              dotp += double(qkv[std::size_t((b * s.seq + i) * ld + h * hd + c)]) *
                      qkv[std::size_t((b * s.seq + j) * ld + (s.n_heads + h / group) * hd + c)];
            best = std::max(best, dotp / std::sqrt(double(hd)));
          }
      CHECK(double(smax[std::size_t(h)]) == Approx(best).epsilon(1e-5));
    }
  }
}

TEST_CASE("swiglu backward matches finite differences", "[grad][ops]") {
  CpuBackend<double> be;
  const int rows = 4, ff = 6;
  auto h = random_vector(std::size_t(rows) * 2 * ff, 11, 2.0);
  auto R = random_vector(std::size_t(rows) * ff, 12);
  std::vector<double> out(R.size()), dh(h.size());
  auto loss = [&] {
    be.swiglu_forward(out.data(), h.data(), rows, ff);
    return dot(out, R);
  };
  be.swiglu_backward(dh.data(), R.data(), h.data(), rows, ff);
  CHECK(fd_relative_error(loss, h.data(), dh, all_indices(h.size())) < kTol);
}

// float over a wide range of pre-activations (exp(-a) underflowing and saturating) and rows no
// vector width divides, against the formulas in double.
TEST_CASE("swiglu in float matches its formulas in double", "[ops]") {
  CpuBackend<float> be;
  const int rows = 3, ff = 1037;
  auto h64 = random_vector(std::size_t(rows) * 2 * ff, 14, 30.0);
  h64[0] = 100.0;   // exp(-a) below float's range
  h64[1] = -100.0;  // exp(-a) above it
  const std::vector<float> h(h64.begin(), h64.end());
  const auto g64 = random_vector(std::size_t(rows) * ff, 15);
  const std::vector<float> g(g64.begin(), g64.end());
  std::vector<float> out(std::size_t(rows) * ff), dh(h.size());
  be.swiglu_forward(out.data(), h.data(), rows, ff);
  be.swiglu_backward(dh.data(), g.data(), h.data(), rows, ff);
  double worst = 0;
  for (int r = 0; r < rows; ++r)
    for (int i = 0; i < ff; ++i) {
      const std::size_t ia = std::size_t(r) * 2 * ff + i, ib = ia + ff,
                        io = std::size_t(r) * ff + i;
      const double a = h[ia], b = h[ib], sig = 1.0 / (1.0 + std::exp(-a));
      const double o = a * sig * b, da = g[io] * b * sig * (1.0 + a * (1.0 - sig)),
                   db = g[io] * a * sig;
      worst = std::max({worst, std::abs(o - out[io]) / (1.0 + std::abs(o)),
                        std::abs(da - dh[ia]) / (1.0 + std::abs(da)),
                        std::abs(db - dh[ib]) / (1.0 + std::abs(db))});
    }
  CHECK(worst < 1e-5);
}

TEST_CASE("cross-entropy writes the scaled gradient of the summed loss", "[grad][ops]") {
  CpuBackend<double> be;
  const int n = 5, V = 11;
  const double scale = 0.37;
  auto logits = random_vector(std::size_t(n) * V, 13, 3.0);
  std::vector<std::int32_t> tgt = {0, 10, 3, 3, 7};
  std::vector<double> losses(static_cast<std::size_t>(n));
  auto loss = [&] {
    auto l = logits;
    be.cross_entropy(losses.data(), nullptr, l.data(), tgt.data(), n, V, nullptr);
    double s = 0;
    for (double v : losses) s += v;
    return scale * s;
  };
  auto grad = logits;
  double sum = 0.5;  // the op adds to it
  be.cross_entropy(losses.data(), &sum, grad.data(), tgt.data(), n, V, &scale);
  double direct = 0;  // the op's order: the rows in order, then added to what was there
  for (double v : losses) direct += v;
  CHECK(sum == 0.5 + direct);
  CHECK(fd_relative_error(loss, logits.data(), grad, all_indices(logits.size())) < kTol);
  // Forward value against a direct evaluation.
  for (int i = 0; i < n; ++i) {
    double z = 0;
    for (int v = 0; v < V; ++v) z += std::exp(logits[std::size_t(i * V + v)]);
    CHECK(losses[std::size_t(i)] ==
          Approx(std::log(z) - logits[std::size_t(i * V + tgt[std::size_t(i)])]));
  }
}

TEST_CASE("cross-entropy: a negative target is padding with no loss and no gradient", "[ops]") {
  CpuBackend<float> be;
  const int n = 3, V = 5;
  std::vector<float> logits = {1, 2, 3, 4, 5, 0, 0, 0, 0, 0, 5, 1, 1, 1, 1};
  std::vector<std::int32_t> tgt = {2, -1, 0};
  std::vector<float> losses(3, -7.f);
  double sum = 0;
  const float one = 1.f;
  be.cross_entropy(losses.data(), &sum, logits.data(), tgt.data(), n, V, &one);
  CHECK(sum == double(losses[0]) + double(losses[2]));  // the padding row adds nothing
  CHECK(losses[1] == 0.f);
  for (int v = 0; v < V; ++v) CHECK(logits[std::size_t(V + v)] == 0.f);
  CHECK(losses[0] > 0.f);
  CHECK(losses[2] > 0.f);
}

// float, a vocabulary as wide as the real ones (and no multiple of a vector width), against the
// same quantities in double: the vectorised exp of the row, the log of its float sum.
TEST_CASE("cross-entropy in float over a real-sized vocabulary matches double", "[ops]") {
  CpuBackend<float> be;
  const int n = 6, V = 4099;
  const auto l64 = random_vector(std::size_t(n) * V, 31, 4.0);
  const std::vector<float> logits(l64.begin(), l64.end());
  const std::vector<std::int32_t> tgt = {0, 4098, 17, 17, 2048, 3};
  std::vector<float> losses(std::size_t(n), -1.f), kept = logits;
  be.cross_entropy(losses.data(), nullptr, kept.data(), tgt.data(), n, V, nullptr);
  CHECK(kept == logits);  // without a gradient the logits are left as they were
  std::vector<float> grad = logits, grad_losses(static_cast<std::size_t>(n));
  const float scale = 0.25f;
  be.cross_entropy(grad_losses.data(), nullptr, grad.data(), tgt.data(), n, V, &scale);
  double worst_grad = 0;
  for (int i = 0; i < n; ++i) {
    const double* row = l64.data() + std::size_t(i) * V;
    double mx = row[0], z = 0;
    for (int v = 1; v < V; ++v) mx = std::max(mx, double(float(row[v])));
    for (int v = 0; v < V; ++v) z += std::exp(double(float(row[v])) - mx);
    const int y = tgt[std::size_t(i)];
    const double loss = mx + std::log(z) - double(float(row[y]));
    CHECK(losses[std::size_t(i)] == Approx(loss).epsilon(1e-6));
    CHECK(grad_losses[std::size_t(i)] == losses[std::size_t(i)]);
    for (int v = 0; v < V; ++v) {
      const double g = scale * (std::exp(double(float(row[v])) - mx) / z - (v == y ? 1.0 : 0.0));
      worst_grad = std::max(worst_grad, std::abs(g - grad[std::size_t(i) * V + v]));
    }
  }
  CHECK(worst_grad < 1e-7);
}

TEST_CASE("router backward matches finite differences (both routers, aux and z losses)",
          "[grad][ops][router]") {
  CpuBackend<double> be;
  const int N = 7, E = 6, K = 2;
  for (RouterType type : {RouterType::SoftmaxTopK, RouterType::SigmoidBias}) {
    for (auto [aux, zc] :
         {std::pair{0.0, 0.0}, std::pair{0.3, 0.0}, std::pair{0.0, 0.2}, std::pair{0.1, 0.05}}) {
      const RouterShape s{N, E, K, type, type == RouterType::SigmoidBias ? 2.5 : 1.0};
      auto logits = random_vector(std::size_t(N) * E, 14, 1.5);
      auto bias = random_vector(std::size_t(E), 15, 0.3);
      auto R = random_vector(std::size_t(N) * K, 16);
      std::vector<double> scores(logits.size()), gates(std::size_t(N) * K), stats(3);
      std::vector<std::int32_t> topk(std::size_t(N) * K), counts(static_cast<std::size_t>(E));
      auto loss = [&] {
        be.router_forward(scores.data(), topk.data(), gates.data(), counts.data(), stats.data(),
                          logits.data(), bias.data(), s);
        return dot(gates, R) + aux * stats[0] + zc * stats[1];
      };
      loss();
      const auto topk0 = topk;
      std::vector<double> dl(logits.size());
      be.router_backward(dl.data(), R.data(), logits.data(), scores.data(), topk.data(),
                         gates.data(), counts.data(), s, aux, zc, 1.0);
      INFO("router " << int(type) << " aux " << aux << " z " << zc);
      CHECK(fd_relative_error(loss, logits.data(), dl, all_indices(logits.size())) < kTol);
      // With a loss scale g the incoming gate gradients are already g * R; the result must be
      // the gradient of g * loss (the scale applied once, not twice).
      const double g = 0.37;
      std::vector<double> gR(R.size());
      for (std::size_t i = 0; i < R.size(); ++i) gR[i] = g * R[i];
      be.router_backward(dl.data(), gR.data(), logits.data(), scores.data(), topk.data(),
                         gates.data(), counts.data(), s, aux, zc, g);
      auto scaled_loss = [&] { return g * loss(); };
      CHECK(fd_relative_error(scaled_loss, logits.data(), dl, all_indices(logits.size())) < kTol);
      loss();
      CHECK(topk == topk0);  // the check stayed away from top-k ties
    }
  }
}

TEST_CASE("router forward: selection, gates, aux and z against a direct evaluation",
          "[ops][router]") {
  CpuBackend<double> be;
  const int N = 9, E = 5, K = 3;
  for (RouterType type : {RouterType::SoftmaxTopK, RouterType::SigmoidBias}) {
    const double rscale = type == RouterType::SigmoidBias ? 1.7 : 1.0;
    const RouterShape s{N, E, K, type, rscale};
    auto logits = random_vector(std::size_t(N) * E, 17, 2.0);
    auto bias = random_vector(std::size_t(E), 18, 0.5);
    std::vector<double> scores(logits.size()), gates(std::size_t(N) * K), stats(3);
    std::vector<std::int32_t> topk(std::size_t(N) * K), counts(static_cast<std::size_t>(E));
    be.router_forward(scores.data(), topk.data(), gates.data(), counts.data(), stats.data(),
                      logits.data(), bias.data(), s);
    std::vector<double> P(std::size_t(E), 0.0), f(std::size_t(E), 0.0);
    double z = 0;
    for (int t = 0; t < N; ++t) {
      const double* l = &logits[std::size_t(t * E)];
      double se = 0;
      for (int e = 0; e < E; ++e) se += std::exp(l[e]);
      z += std::log(se) * std::log(se);
      std::vector<double> sc(static_cast<std::size_t>(E)), key(static_cast<std::size_t>(E));
      double ssum = 0;
      for (int e = 0; e < E; ++e) {
        sc[std::size_t(e)] =
            type == RouterType::SoftmaxTopK ? std::exp(l[e]) / se : 1 / (1 + std::exp(-l[e]));
        key[std::size_t(e)] =
            sc[std::size_t(e)] + (type == RouterType::SigmoidBias ? bias[std::size_t(e)] : 0);
        ssum += sc[std::size_t(e)];
      }
      for (int e = 0; e < E; ++e) P[std::size_t(e)] += sc[std::size_t(e)] / ssum / N;
      std::vector<int> order(static_cast<std::size_t>(E));
      for (int e = 0; e < E; ++e) order[std::size_t(e)] = e;
      std::stable_sort(order.begin(), order.end(),
                       [&](int a, int b) { return key[std::size_t(a)] > key[std::size_t(b)]; });
      double chosen = 0;
      for (int j = 0; j < K; ++j) chosen += sc[std::size_t(order[std::size_t(j)])];
      for (int j = 0; j < K; ++j) {
        const int e = order[std::size_t(j)];
        CHECK(topk[std::size_t(t * K + j)] == e);
        CHECK(gates[std::size_t(t * K + j)] == Approx(rscale * sc[std::size_t(e)] / chosen));
        f[std::size_t(e)] += 1.0 / (N * K);
      }
    }
    double aux = 0;
    for (int e = 0; e < E; ++e) {
      aux += E * f[std::size_t(e)] * P[std::size_t(e)];
      CHECK(counts[std::size_t(e)] == int(std::lround(f[std::size_t(e)] * N * K)));
    }
    CHECK(stats[0] == Approx(aux));
    CHECK(stats[1] == Approx(z / N));
  }
}

// Logits far below zero: every sigmoid score underflows (to 0 in float below about -103, in double
// below about -745), and gates, distribution and gradient must still be those of the limit, where
// s_e = e^l_e: gates = r softmax(chosen logits).
TEST_CASE("sigmoid router with underflowing scores: finite gates and gradients of the limit",
          "[grad][ops][router]") {
  const int N = 5, E = 6, K = 2;
  const double r = 2.5;
  const RouterShape s{N, E, K, RouterType::SigmoidBias, r};
  auto bias = random_vector(std::size_t(E), 21, 0.3);  // picks the experts: every score is 0
  {
    // Float, logits about -150: the chosen gates against r softmax of their logits in double.
    CpuBackend<float> be;
    auto l64 = random_vector(std::size_t(N) * E, 22, 2.0);
    std::vector<float> logits(l64.size()), bias32(bias.begin(), bias.end());
    for (std::size_t i = 0; i < l64.size(); ++i) logits[i] = float(l64[i] - 150.0);
    std::vector<float> scores(logits.size()), gates(std::size_t(N) * K), stats(3),
        dgates(std::size_t(N) * K, 1.0f), dl(logits.size());
    std::vector<std::int32_t> topk(std::size_t(N) * K), counts(static_cast<std::size_t>(E));
    be.router_forward(scores.data(), topk.data(), gates.data(), counts.data(), stats.data(),
                      logits.data(), bias32.data(), s);
    be.router_backward(dl.data(), dgates.data(), logits.data(), scores.data(), topk.data(),
                       gates.data(), counts.data(), s, 0.1, 0.01, 1.0);
    for (float v : scores) CHECK(v == 0.0f);
    for (float v : stats) CHECK(std::isfinite(v));
    for (float v : dl) CHECK(std::isfinite(v));
    for (int t = 0; t < N; ++t) {
      double z = 0;
      for (int j = 0; j < K; ++j)
        z += std::exp(double(logits[std::size_t(t * E + topk[t * K + j])]));
      for (int j = 0; j < K; ++j) {
        const double want = r * std::exp(double(logits[std::size_t(t * E + topk[t * K + j])])) / z;
        CHECK(gates[std::size_t(t * K + j)] == Approx(want).epsilon(1e-6));
      }
    }
  }
  // Double, logits about -800: the backward against finite differences, aux and z losses on.
  CpuBackend<double> be;
  auto logits = random_vector(std::size_t(N) * E, 23, 1.5);
  for (auto& x : logits) x -= 800.0;
  auto R = random_vector(std::size_t(N) * K, 24);
  std::vector<double> scores(logits.size()), gates(std::size_t(N) * K), stats(3);
  std::vector<std::int32_t> topk(std::size_t(N) * K), counts(static_cast<std::size_t>(E));
  const double aux = 0.1, zc = 1e-4;
  auto loss = [&] {
    be.router_forward(scores.data(), topk.data(), gates.data(), counts.data(), stats.data(),
                      logits.data(), bias.data(), s);
    return dot(gates, R) + aux * stats[0] + zc * stats[1];
  };
  loss();
  for (double v : scores) CHECK(v == 0.0);
  std::vector<double> dl(logits.size());
  be.router_backward(dl.data(), R.data(), logits.data(), scores.data(), topk.data(), gates.data(),
                     counts.data(), s, aux, zc, 1.0);
  CHECK(fd_relative_error(loss, logits.data(), dl, all_indices(logits.size())) < kTol);
}

TEST_CASE("router top-k ties go to the lower expert index", "[ops][router]") {
  CpuBackend<float> be;
  const int N = 3, E = 6, K = 2;
  // Token 0: all equal. Token 1: experts 2, 4 and 5 tie for the top. Token 2: 1 and 3 tie second.
  std::vector<float> logits = {0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 1, 0, 1, 2, 1, 0, 0};
  for (RouterType type : {RouterType::SoftmaxTopK, RouterType::SigmoidBias}) {
    std::vector<float> scores(logits.size()), gates(std::size_t(N) * K), stats(3);
    std::vector<std::int32_t> topk(std::size_t(N) * K), counts(static_cast<std::size_t>(E));
    be.router_forward(scores.data(), topk.data(), gates.data(), counts.data(), stats.data(),
                      logits.data(), nullptr, RouterShape{N, E, K, type, 1.0});
    CHECK(topk == std::vector<std::int32_t>{0, 1, 2, 4, 2, 1});
  }
}

TEST_CASE("MoE permute / unpermute backward match finite differences", "[grad][ops][moe]") {
  CpuBackend<double> be;
  const int N = 6, d = 3, E = 4, K = 2;
  std::vector<std::int32_t> topk = {1, 3, 0, 1, 3, 2, 1, 0, 2, 3, 3, 1};
  std::vector<std::int32_t> counts(std::size_t(E), 0);
  for (auto e : topk) ++counts[std::size_t(e)];
  auto x = random_vector(std::size_t(N) * d, 19);
  std::vector<double> xg(std::size_t(N) * K * d);
  std::vector<std::int32_t> pos(std::size_t(N) * K), offsets(std::size_t(E) + 1);
  be.moe_permute(xg.data(), pos.data(), offsets.data(), x.data(), topk.data(), counts.data(), N, d,
                 E, K);
  // Grouped by expert, in token order within each expert.
  for (int e = 0; e < E; ++e)
    CHECK(offsets[std::size_t(e) + 1] - offsets[std::size_t(e)] == counts[std::size_t(e)]);
  for (int a = 0; a < N * K; ++a) {
    const int e = topk[std::size_t(a)];
    CHECK(pos[std::size_t(a)] >= offsets[std::size_t(e)]);
    CHECK(pos[std::size_t(a)] < offsets[std::size_t(e) + 1]);
    for (int c = 0; c < d; ++c)
      CHECK(xg[std::size_t(pos[std::size_t(a)] * d + c)] == x[std::size_t(a / K * d + c)]);
  }
  auto R1 = random_vector(xg.size(), 20);
  auto loss_p = [&] {
    be.moe_permute(xg.data(), pos.data(), offsets.data(), x.data(), topk.data(), counts.data(), N,
                   d, E, K);
    return dot(xg, R1);
  };
  std::vector<double> dx(x.size(), 0.0);
  be.moe_permute_backward(dx.data(), R1.data(), pos.data(), N, d, K);
  CHECK(fd_relative_error(loss_p, x.data(), dx, all_indices(x.size())) < kTol);

  auto yg = random_vector(xg.size(), 21);
  auto gates = random_vector(std::size_t(N) * K, 22);
  auto R2 = random_vector(x.size(), 23);
  std::vector<double> y(x.size());
  auto loss_u = [&] {
    be.moe_unpermute(y.data(), yg.data(), gates.data(), pos.data(), N, d, K);
    return dot(y, R2);
  };
  std::vector<double> dyg(yg.size()), dgates(gates.size());
  be.moe_unpermute_backward(dyg.data(), dgates.data(), R2.data(), yg.data(), gates.data(),
                            pos.data(), N, d, K);
  CHECK(fd_relative_error(loss_u, yg.data(), dyg, all_indices(yg.size())) < kTol);
  CHECK(fd_relative_error(loss_u, gates.data(), dgates, all_indices(gates.size())) < kTol);
}
