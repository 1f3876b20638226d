// Optimizers (docs/design.md §4) against references written out in this file: AdamW with bias
// correction and decoupled decay, Muon with an independent Newton-Schulz quintic in plain loops,
// global gradient-norm clipping, MuonClip's per-head QK-clip, state round trips and bad input.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "gradcheck.hpp"
#include "moetrain/cpu_backend.hpp"
#include "moetrain/optimizer.hpp"
#include "moetrain/param_layout.hpp"
#include "moetrain/safetensors.hpp"
#include "test_util.hpp"

using namespace moetrain;
using namespace moetrain::test;

namespace {

using Mat = std::vector<double>;

// Shapes chosen so the Muon group holds tall ([12, 8] q_proj, [10, 8] dense w1/w3, [8, 5]
// expert w2) and wide ([6, 8] k/v, [8, 12] o_proj, [5, 8] expert w1/w3) matrices.
ModelConfig optim_model(int heads = 4, int kv_heads = 2) {
  ModelConfig c =
      tiny_model({.vocab = 11, .layers = 2, .heads = heads, .kv_heads = kv_heads, .experts = 3});
  c.head_dim = 3;  // odd: the model takes it, a config file may not
  return c;
}

// Group settings that differ from each other and from the defaults, so a mix-up shows.
Config optim_config(OptimizerName name) {
  Config c;
  c.model = optim_model();
  c.optim.name = name;
  c.optim.grad_clip = 0;
  c.optim.muon_group.lr_scale = 0.5;
  c.optim.muon_group.weight_decay = 0.2;
  c.optim.adamw_group.lr_scale = 2.0;
  c.optim.adamw_group.weight_decay = 0.05;
  c.optim.beta1 = 0.8;
  c.optim.beta2 = 0.9;
  c.optim.eps = 1e-3;  // large enough to matter in the formula
  c.optim.momentum = 0.9;
  return c;
}

// The Muon group by role, written out here (docs/design.md §4): q/k/v/o and every FFN matrix.
bool hidden_role(ParamRole r) {
  switch (r) {
    case ParamRole::AttnQ:
    case ParamRole::AttnK:
    case ParamRole::AttnV:
    case ParamRole::AttnO:
    case ParamRole::FfnW1:
    case ParamRole::FfnW3:
    case ParamRole::FfnW2:
      return true;
    default:
      return false;
  }
}

// A device copy of a host vector.
template <typename T>
struct Device {
  Device(Backend<T>& b, const std::vector<T>& host) : be(b), buf(b, host.size()) { upload(host); }
  void upload(const std::vector<T>& h) { be.upload(buf.get(), h.data(), h.size() * sizeof(T)); }
  std::vector<T> download() const {
    std::vector<T> h(buf.size());
    be.download(h.data(), buf.get(), h.size() * sizeof(T));
    return h;
  }
  T* get() { return buf.get(); }
  Backend<T>& be;
  DeviceBuffer<T, T> buf;
};

double max_abs_diff(const Mat& a, const Mat& b) {
  REQUIRE(a.size() == b.size());
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

Mat slice(const Mat& v, std::size_t off, std::size_t n) {
  return Mat(v.begin() + std::ptrdiff_t(off), v.begin() + std::ptrdiff_t(off + n));
}

// NS5 of docs/design.md §4 on an [A, B] matrix: X = U / (|U|_F + 1e-7); work on X^T when A > B;
// X = a X + (b S + c S S) X with S = X X^T; transpose back.
Mat ns5(const Mat& U, int A, int B, int steps) {
  const double a = 3.4445, b = -4.7750, c = 2.0315;
  double nrm = 0;
  for (double x : U) nrm += x * x;
  nrm = std::sqrt(nrm);
  Mat X(U.size());
  for (std::size_t i = 0; i < U.size(); ++i) X[i] = U[i] / (nrm + 1e-7);
  const bool tall = A > B;
  if (tall) X = transpose(X, A, B);
  const int m = tall ? B : A, n = tall ? A : B;
  for (int it = 0; it < steps; ++it) {
    const Mat S = matmul(X, transpose(X, m, n), m, n, m);
    const Mat SS = matmul(S, S, m, m, m);
    Mat P(S.size());
    for (std::size_t i = 0; i < P.size(); ++i) P[i] = b * S[i] + c * SS[i];
    const Mat PX = matmul(P, X, m, m, n);
    for (std::size_t i = 0; i < X.size(); ++i) X[i] = a * X[i] + PX[i];
  }
  return tall ? transpose(X, m, n) : X;
}

double muon_scale(MuonScale mode, int A, int B) {
  if (mode == MuonScale::Original) return std::sqrt(std::max(1.0, double(A) / double(B)));
  return 0.2 * std::sqrt(double(std::max(A, B)));
}

// The optimizers of docs/design.md §4 on host vectors, tensor by tensor.
struct RefOptimizer {
  RefOptimizer(const Config& c, const ParamLayout& l) : cfg(c), layout(l) {}

  void step(Mat& p, Mat& g, double lr) {
    const OptimConfig& o = cfg.optim;
    const bool use_muon = o.name != OptimizerName::AdamW;
    double ss = 0;
    for (double x : g) ss += x * x;
    grad_norm = std::sqrt(ss);
    if (o.grad_clip > 0 && grad_norm > o.grad_clip)
      for (double& x : g) x *= o.grad_clip / (grad_norm + 1e-6);
    ++t;
    double sq_a = 0, sq_m = 0;
    std::size_t n_a = 0, n_m = 0;
    for (const ParamTensor& pt : layout.tensors()) {
      const bool hidden = hidden_role(pt.role);
      const std::size_t off = pt.offset, n = pt.numel;
      if (use_muon && hidden) {
        const int A = int(pt.shape[0]), B = int(pt.shape[1]);
        Mat& M = momentum[pt.name];
        M.resize(n, 0.0);
        Mat U(n);
        for (std::size_t i = 0; i < n; ++i) {
          M[i] = o.momentum * M[i] + g[off + i];
          U[i] = o.nesterov ? g[off + i] + o.momentum * M[i] : M[i];
        }
        const Mat O = ns5(U, A, B, o.ns_steps);
        const double s = muon_scale(o.muon_scale, A, B);
        const double lr_t = lr * o.muon_group.lr_scale, wd = o.muon_group.weight_decay;
        for (std::size_t i = 0; i < n; ++i) {
          const double u = s * O[i];
          p[off + i] = p[off + i] - lr_t * (u + wd * p[off + i]);
          sq_m += u * u;
        }
        n_m += n;
      } else {
        const GroupConfig& gc = hidden ? o.muon_group : o.adamw_group;
        const double wd = pt.role == ParamRole::Norm ? 0.0 : gc.weight_decay;
        const double lr_t = lr * gc.lr_scale;
        Mat& mm = m[pt.name];
        Mat& vv = v[pt.name];
        mm.resize(n, 0.0);
        vv.resize(n, 0.0);
        const double bc1 = 1 - std::pow(o.beta1, double(t)), bc2 = 1 - std::pow(o.beta2, double(t));
        for (std::size_t i = 0; i < n; ++i) {
          const double gi = g[off + i];
          mm[i] = o.beta1 * mm[i] + (1 - o.beta1) * gi;
          vv[i] = o.beta2 * vv[i] + (1 - o.beta2) * gi * gi;
          const double u = (mm[i] / bc1) / (std::sqrt(vv[i] / bc2) + o.eps);
          p[off + i] = p[off + i] - lr_t * (u + wd * p[off + i]);
          sq_a += u * u;
        }
        n_a += n;
      }
    }
    rms_adamw = n_a ? std::sqrt(sq_a / double(n_a)) : 0.0;
    rms_muon = n_m ? std::sqrt(sq_m / double(n_m)) : 0.0;
  }

  Config cfg;
  const ParamLayout& layout;
  std::map<std::string, Mat> m, v, momentum;
  std::int64_t t = 0;
  double grad_norm = 0, rms_adamw = 0, rms_muon = 0;
};

}  // namespace

TEST_CASE("AdamW: one and three steps follow the formula with per-group settings", "[optim]") {
  const Config cfg = optim_config(OptimizerName::AdamW);
  const ParamLayout layout(cfg.model);
  const std::size_t n = layout.total();
  CpuBackend<double> be;
  Optimizer<double> opt(cfg, layout, be);
  RefOptimizer ref(cfg, layout);
  Mat p = random_vector(n, 1, 0.5);
  Device<double> dp(be, p), dg(be, Mat(n, 0.0));
  const double lrs[] = {1e-2, 3e-2, 2e-2};
  for (int s = 0; s < 3; ++s) {
    INFO("step " << s + 1);
    Mat g = random_vector(n, 100 + std::uint64_t(s), 0.1 * (s + 1));
    dg.upload(g);
    const OptimizerStats st = opt.step(dp.get(), dg.get(), lrs[s], {});
    ref.step(p, g, lrs[s]);
    CHECK(opt.step_count() == s + 1);
    CHECK(max_abs_diff(dp.download(), p) < 1e-13);
    CHECK(st.grad_norm == Approx(ref.grad_norm).epsilon(1e-13));
    CHECK(st.update_rms_adamw == Approx(ref.rms_adamw).epsilon(1e-12));
    CHECK(st.update_rms_muon == 0.0);  // adamw: no Muon group
    CHECK(st.clipped_heads == 0);
  }
  // (m and v are checked through the updates: with eps = 1e-3 each step's update depends on
  // both moments' magnitudes, not only on their ratio.) The state holds no Muon momentum.
  const TensorMap st = opt.state();
  for (const auto& [name, t] : st) {
    INFO(name);
    CHECK(name.rfind("muon.", 0) == std::string::npos);
  }
  CHECK(st.at("step").to_i64() == std::vector<std::int64_t>{3});
}

TEST_CASE("AdamW: RMSNorm gains never decay, other tensors decay by their group", "[optim]") {
  // Zero gradients isolate the decay: m = v = 0, so the update is p -= lr * wd * p exactly.
  Config cfg = optim_config(OptimizerName::AdamW);
  const ParamLayout layout(cfg.model);
  const std::size_t n = layout.total();
  CpuBackend<double> be;
  Optimizer<double> opt(cfg, layout, be);
  const Mat p = random_vector(n, 3, 1.0);
  Device<double> dp(be, p), dg(be, Mat(n, 0.0));
  const double lr = 0.1;
  opt.step(dp.get(), dg.get(), lr, {});
  const Mat after = dp.download();
  int norms = 0;
  for (const ParamTensor& t : layout.tensors()) {
    INFO(t.name);
    const GroupConfig& gc = hidden_role(t.role) ? cfg.optim.muon_group : cfg.optim.adamw_group;
    const double factor =
        t.role == ParamRole::Norm ? 1.0 : 1.0 - lr * gc.lr_scale * gc.weight_decay;
    norms += t.role == ParamRole::Norm;
    for (std::size_t i = 0; i < t.numel; ++i)
      REQUIRE(after[t.offset + i] == Approx(p[t.offset + i] * factor).epsilon(1e-14));
  }
  CHECK(norms == 2 * cfg.model.n_layers + 1);
}

TEST_CASE("Muon: updates follow lr*(s*O + wd*W) with an independent NS5", "[optim]") {
  for (const bool nesterov : {true, false})
    for (const MuonScale scale : {MuonScale::MatchRmsAdamW, MuonScale::Original}) {
      INFO("nesterov " << nesterov << ", muon_scale " << to_string(scale));
      Config cfg = optim_config(OptimizerName::Muon);
      cfg.optim.nesterov = nesterov;
      cfg.optim.muon_scale = scale;
      const ParamLayout layout(cfg.model);
      const std::size_t n = layout.total();
      // The layout holds both orientations, so the transpose rule is exercised.
      int wide = 0, tall = 0;
      for (const ParamTensor& t : layout.tensors())
        if (hidden_role(t.role)) {
          wide += t.shape[0] < t.shape[1];
          tall += t.shape[0] > t.shape[1];
        }
      REQUIRE(wide > 0);
      REQUIRE(tall > 0);

      CpuBackend<double> be;
      Optimizer<double> opt(cfg, layout, be);
      RefOptimizer ref(cfg, layout);
      Mat p = random_vector(n, 11, 0.3);
      Device<double> dp(be, p), dg(be, Mat(n, 0.0));
      const double lrs[] = {2e-2, 5e-2, 1e-2};
      for (int s = 0; s < 3; ++s) {
        INFO("step " << s + 1);
        Mat g = random_vector(n, 200 + std::uint64_t(s), 0.05 * (s + 1));
        dg.upload(g);
        const OptimizerStats st = opt.step(dp.get(), dg.get(), lrs[s], {});
        ref.step(p, g, lrs[s]);
        const Mat got = dp.download();
        for (const ParamTensor& t : layout.tensors()) {
          INFO(t.name);
          REQUIRE(max_abs_diff(slice(got, t.offset, t.numel), slice(p, t.offset, t.numel)) < 1e-12);
        }
        CHECK(st.update_rms_muon == Approx(ref.rms_muon).epsilon(1e-11));
        CHECK(st.update_rms_adamw == Approx(ref.rms_adamw).epsilon(1e-12));
      }
      // Momentum accumulated over the three steps: M = mu M + G.
      const TensorMap st = opt.state();
      for (const ParamTensor& t : layout.tensors()) {
        INFO(t.name);
        if (hidden_role(t.role)) {
          const auto& M = st.at("muon.momentum." + t.name);
          CHECK(M.shape == t.shape);
          CHECK(max_abs_diff(M.to_f64(), ref.momentum[t.name]) < 1e-15);
        } else {
          CHECK(st.count("muon.momentum." + t.name) == 0);
        }
      }
    }
}

TEST_CASE("Muon: momentum is M = mu M + G, the update uses G + mu M or M", "[optim]") {
  // lr = 0 leaves the weights alone, so only the momentum buffer moves; check it against the
  // recurrence over four steps, independently of NS5.
  Config cfg = optim_config(OptimizerName::Muon);
  const ParamLayout layout(cfg.model);
  const std::size_t n = layout.total();
  CpuBackend<double> be;
  Optimizer<double> opt(cfg, layout, be);
  const Mat p = random_vector(n, 5, 0.3);
  Device<double> dp(be, p), dg(be, Mat(n, 0.0));
  const ParamTensor& q = layout.find("layers.1.attn.q_proj.weight");
  Mat M(q.numel, 0.0);
  for (int s = 0; s < 4; ++s) {
    const Mat g = random_vector(n, 300 + std::uint64_t(s));
    dg.upload(g);
    opt.step(dp.get(), dg.get(), 0.0, {});
    for (std::size_t i = 0; i < q.numel; ++i) M[i] = 0.9 * M[i] + g[q.offset + i];
  }
  CHECK(max_abs_diff(opt.state().at("muon.momentum." + q.name).to_f64(), M) < 1e-14);
  CHECK(std::memcmp(dp.download().data(), p.data(), n * sizeof(double)) == 0);
}

TEST_CASE("Muon: NS5 output has singular values in about 0.6 to 1.25", "[optim]") {
  // With lr 1, no decay and no momentum, W_old - W_new = s * O exactly for every Muon matrix.
  Config cfg = optim_config(OptimizerName::Muon);
  cfg.optim.momentum = 0;
  cfg.optim.nesterov = false;
  cfg.optim.muon_group.lr_scale = 1;
  cfg.optim.muon_group.weight_decay = 0;
  const ParamLayout layout(cfg.model);
  const std::size_t n = layout.total();
  CpuBackend<double> be;
  Optimizer<double> opt(cfg, layout, be);
  const Mat p = random_vector(n, 21, 1.0);
  const Mat g = random_vector(n, 22, 1.0);
  Device<double> dp(be, p), dg(be, g);
  opt.step(dp.get(), dg.get(), 1.0, {});
  const Mat after = dp.download();
  int checked = 0;
  for (const ParamTensor& t : layout.tensors()) {
    if (!hidden_role(t.role)) continue;
    INFO(t.name);
    const int A = int(t.shape[0]), B = int(t.shape[1]);
    const double s = muon_scale(cfg.optim.muon_scale, A, B);
    Mat O(t.numel);
    for (std::size_t i = 0; i < t.numel; ++i) O[i] = (p[t.offset + i] - after[t.offset + i]) / s;
    // Gram matrix on the smaller side: its eigenvalues are the squared singular values.
    const int m = std::min(A, B);
    const Mat gram =
        A <= B ? matmul(O, transpose(O, A, B), A, B, A) : matmul(transpose(O, A, B), O, B, A, B);
    for (double ev : moetrain::test::sym_eigenvalues(gram, m)) {
      CHECK(std::sqrt(std::max(ev, 0.0)) > 0.6);
      CHECK(std::sqrt(std::max(ev, 0.0)) < 1.25);
    }
    ++checked;
  }
  CHECK(checked > 10);
}

namespace {

// The Newton-Schulz output O of one Muon step whose only nonzero gradient is `g` on tensor `name`
// (no momentum, no decay, lr 1: W_old - W_new = s * O).
Mat ns_output(NsCoefficients coefficients, const std::string& name, const Mat& g) {
  Config cfg = optim_config(OptimizerName::Muon);
  cfg.optim.momentum = 0;
  cfg.optim.nesterov = false;
  cfg.optim.muon_group.lr_scale = 1;
  cfg.optim.muon_group.weight_decay = 0;
  cfg.optim.ns_coefficients = coefficients;
  const ParamLayout layout(cfg.model);
  const ParamTensor& t = layout.find(name);
  REQUIRE(g.size() == t.numel);
  CpuBackend<double> be;
  Optimizer<double> opt(cfg, layout, be);
  const Mat p = random_vector(layout.total(), 3, 1.0);
  Mat grad(layout.total(), 0.0);
  std::copy(g.begin(), g.end(), grad.begin() + std::ptrdiff_t(t.offset));
  Device<double> dp(be, p), dg(be, grad);
  opt.step(dp.get(), dg.get(), 1.0, {});
  const Mat after = dp.download();
  const double s = muon_scale(cfg.optim.muon_scale, int(t.shape[0]), int(t.shape[1]));
  Mat O(t.numel);
  for (std::size_t i = 0; i < t.numel; ++i) O[i] = (p[t.offset + i] - after[t.offset + i]) / s;
  return O;
}

// `cols` orthonormal columns of length n (Gram-Schmidt of random vectors), row-major [n, cols].
Mat orthonormal_columns(int n, int cols, std::uint64_t seed) {
  Mat q = random_vector(std::size_t(n) * cols, seed, 1.0);
  for (int j = 0; j < cols; ++j) {
    for (int i = 0; i < j; ++i) {
      double dot = 0;
      for (int r = 0; r < n; ++r)
        dot += q[std::size_t(r * cols + i)] * q[std::size_t(r * cols + j)];
      for (int r = 0; r < n; ++r)
        q[std::size_t(r * cols + j)] -= dot * q[std::size_t(r * cols + i)];
    }
    double norm = 0;
    for (int r = 0; r < n; ++r) norm += q[std::size_t(r * cols + j)] * q[std::size_t(r * cols + j)];
    for (int r = 0; r < n; ++r) q[std::size_t(r * cols + j)] /= std::sqrt(norm);
  }
  return q;
}

}  // namespace

TEST_CASE("Newton-Schulz coefficients: a rank-1 gradient s u v^T maps to c(s) u v^T",
          "[optim][ns]") {
  // ../shared/OPTIMIZERS.md §1: NS5 gives 0.696436 for any s; Polar Express 0.903692 at s = 1,
  // 0.903579 at 3.7, 0.903539 at 100, tending to 0.903537 (its normalisation adds 1e-6).
  const std::string name = "layers.1.attn.k_proj.weight";  // [6, 8]
  const Mat u = orthonormal_columns(6, 1, 7), v = orthonormal_columns(8, 1, 8);
  const struct {
    NsCoefficients c;
    double s, want;
  } cases[] = {{NsCoefficients::Muon, 1.0, 0.696436},
               {NsCoefficients::Muon, 100.0, 0.696436},
               {NsCoefficients::PolarExpress, 1.0, 0.903692},
               {NsCoefficients::PolarExpress, 3.7, 0.903579},
               {NsCoefficients::PolarExpress, 100.0, 0.903539},
               {NsCoefficients::PolarExpress, 1e6, 0.903537}};
  for (const auto& c : cases) {
    INFO(to_string(c.c) << " s = " << c.s);
    Mat g(48);
    for (int i = 0; i < 6; ++i)
      for (int j = 0; j < 8; ++j)
        g[std::size_t(i * 8 + j)] = c.s * u[std::size_t(i)] * v[std::size_t(j)];
    const Mat O = ns_output(c.c, name, g);
    for (int i = 0; i < 6; ++i)
      for (int j = 0; j < 8; ++j)
        CHECK(O[std::size_t(i * 8 + j)] ==
              Approx(c.want * u[std::size_t(i)] * v[std::size_t(j)]).margin(1e-6));
  }
}

TEST_CASE(
    "Newton-Schulz coefficients: singular values land in each polynomial's band, singular "
    "vectors are kept",
    "[optim][ns]") {
  // G = U diag(sigma) V^T on a tall [12, 8] matrix with sigma / ||G||_F from 1 down to 1e-3:
  // Polar Express maps x = sigma / (1.02 ||G||_F) in [1e-3, 1] / 1.02 into [0.8466, 1.1411], NS5
  // maps sigma / ||G||_F into [0.47, 1.20] (OPTIMIZERS.md §1).
  const std::string name = "layers.1.attn.q_proj.weight";  // [12, 8]
  const int A = 12, B = 8;
  const Mat U = orthonormal_columns(A, B, 21), V = orthonormal_columns(B, B, 22);
  // sigma_k / ||G||_F = rel_k / sqrt(sum rel^2) (sqrt(sum) = 1.21): from 0.83 down to 1.07e-3.
  const double rel[B] = {1.0, 0.6, 0.3, 0.1, 0.03, 0.01, 0.003, 0.0013};
  double frob = 0;
  for (double r : rel) frob += r * r;
  Mat g(std::size_t(A) * B, 0.0);
  for (int i = 0; i < A; ++i)
    for (int j = 0; j < B; ++j)
      for (int k = 0; k < B; ++k)  // sigma_k = rel_k * ||G||_F with ||G||_F = 5 (any scale)
        g[std::size_t(i * B + j)] +=
            U[std::size_t(i * B + k)] * 5.0 * rel[k] / std::sqrt(frob) * V[std::size_t(j * B + k)];
  for (const NsCoefficients c : {NsCoefficients::Muon, NsCoefficients::PolarExpress}) {
    INFO(to_string(c));
    const Mat O = ns_output(c, name, g);
    // U^T O V: diagonal (the singular vectors are G's), its diagonal the singular values.
    const Mat D = matmul(matmul(transpose(U, A, B), O, B, A, B), V, B, B, B);
    const double lo = c == NsCoefficients::Muon ? 0.47 : 0.8466;
    const double hi = c == NsCoefficients::Muon ? 1.20 : 1.1411;
    for (int i = 0; i < B; ++i)
      for (int j = 0; j < B; ++j) {
        const double d = D[std::size_t(i * B + j)];
        if (i == j) {
          CHECK(d >= lo);
          CHECK(d <= hi);
        } else {
          CHECK(std::abs(d) < 1e-9);
        }
      }
  }
}

TEST_CASE("global gradient-norm clipping", "[optim]") {
  // AdamW's first update is g / (|g| + eps) elementwise: with eps = 1e-3 against gradients of
  // about 1e-2 it depends on the gradient's scale, so the updated weights show whether (and by
  // how much) the gradient was clipped. The reference clips by clip / (norm + 1e-6).
  Config cfg = optim_config(OptimizerName::AdamW);
  cfg.optim.grad_clip = 1.0;
  const ParamLayout layout(cfg.model);
  const std::size_t n = layout.total();
  auto norm_of = [](const Mat& g) {
    double s = 0;
    for (double x : g) s += x * x;
    return std::sqrt(s);
  };
  auto run = [&](const Config& c, const Mat& g, double expected_scale) {
    CpuBackend<double> be;
    Optimizer<double> opt(c, layout, be);
    const Mat p0 = random_vector(n, 32);
    Device<double> dp(be, p0), dg(be, g);
    const OptimizerStats st = opt.step(dp.get(), dg.get(), 1e-2, {});
    CHECK(st.grad_norm == Approx(norm_of(g)).epsilon(1e-13));
    // The caller's gradient buffer is left as it was.
    CHECK(std::memcmp(dg.download().data(), g.data(), n * sizeof(double)) == 0);
    // Expected weights from the AdamW formula on expected_scale * g, written out directly.
    const Mat got = dp.download();
    const OptimConfig& o = c.optim;
    for (const ParamTensor& t : layout.tensors()) {
      const GroupConfig& gc = hidden_role(t.role) ? o.muon_group : o.adamw_group;
      const double wd = t.role == ParamRole::Norm ? 0.0 : gc.weight_decay, lr = 1e-2 * gc.lr_scale;
      for (std::size_t i = t.offset; i < t.offset + t.numel; ++i) {
        const double gi = expected_scale * g[i];
        const double m_hat = (1 - o.beta1) * gi / (1 - o.beta1);
        const double v_hat = (1 - o.beta2) * gi * gi / (1 - o.beta2);
        const double want = p0[i] - lr * (m_hat / (std::sqrt(v_hat) + o.eps) + wd * p0[i]);
        REQUIRE(got[i] == Approx(want).epsilon(1e-12));
      }
    }
  };
  SECTION("above the threshold: scaled by clip / (norm + 1e-6)") {
    const Mat g = random_vector(n, 31, 0.1);
    const double norm = norm_of(g);
    REQUIRE(norm > 2.0);
    run(cfg, g, 1.0 / (norm + 1e-6));
  }
  SECTION("below the threshold: untouched") {
    const Mat g = random_vector(n, 33, 0.01);
    REQUIRE(norm_of(g) < 0.9);
    run(cfg, g, 1.0);
  }
  SECTION("grad_clip 0 disables clipping") {
    cfg.optim.grad_clip = 0;
    const Mat g = random_vector(n, 35, 0.1);
    REQUIRE(norm_of(g) > 2.0);
    run(cfg, g, 1.0);
  }
  SECTION("the clip threshold is the configured one") {
    cfg.optim.grad_clip = 0.5;
    const Mat g = random_vector(n, 37, 0.018);
    const double norm = norm_of(g);
    REQUIRE(norm > 0.5);
    REQUIRE(norm < 0.9);
    run(cfg, g, 0.5 / (norm + 1e-6));
  }
}

TEST_CASE(
    "QK-clip scales q rows by gamma^alpha, k rows by min gamma^(1-alpha), after any "
    "optimizer",
    "[optim]") {
  const double tau = 100;
  // Per layer and query head; 100 equals tau (not clipped), negative logits never clip.
  const std::vector<std::vector<double>> smax = {{150, 50, 100, 400}, {-3, 250, 120, 99}};
  const int expected_clipped = 4;
  struct Shape {
    int heads, kv_heads;
  };
  // muonclip; adamw + qk_clip (q and k in AdamW's shard: every rank clips its copy); muon +
  // qk_clip (the same as muonclip).
  struct Clipped {
    OptimizerName name;
    bool qk_clip;
  };
  for (const Clipped oc : {Clipped{OptimizerName::MuonClip, false},
                           Clipped{OptimizerName::AdamW, true}, Clipped{OptimizerName::Muon, true}})
    for (const Shape sh : {Shape{4, 4}, Shape{4, 2}, Shape{4, 1}})
      for (const double alpha : {0.5, 1.0}) {
        INFO(to_string(oc.name) << " qk_clip " << oc.qk_clip << ", heads " << sh.heads << "/"
                                << sh.kv_heads << ", alpha " << alpha);
        Config cfg = optim_config(oc.name);
        cfg.optim.qk_clip = oc.qk_clip;
        cfg.model = optim_model(sh.heads, sh.kv_heads);
        cfg.optim.qk_clip_tau = tau;
        cfg.optim.qk_clip_alpha = alpha;
        const ParamLayout layout(cfg.model);
        const std::size_t n = layout.total();
        CpuBackend<double> be;
        Optimizer<double> opt(cfg, layout, be);
        const Mat p = random_vector(n, 41, 0.3);
        Device<double> dp(be, p), dg(be, random_vector(n, 42));
        // lr 0: the optimizer update leaves every weight as it was, so only the clip acts.
        const OptimizerStats st = opt.step(dp.get(), dg.get(), 0.0, smax);
        CHECK(st.clipped_heads == expected_clipped);
        const Mat after = dp.download();
        const std::size_t hd = std::size_t(cfg.model.head_dim), d = std::size_t(cfg.model.d_model);
        const std::size_t head = hd * d;  // elements of one head's rows
        const int group = sh.heads / sh.kv_heads;
        for (int l = 0; l < cfg.model.n_layers; ++l) {
          const std::string pre = "layers." + std::to_string(l) + ".attn.";
          const ParamTensor& q = layout.find(pre + "q_proj.weight");
          const ParamTensor& k = layout.find(pre + "k_proj.weight");
          std::vector<double> gamma(std::size_t(sh.heads));
          for (int h = 0; h < sh.heads; ++h) {
            const double s = smax[std::size_t(l)][std::size_t(h)];
            gamma[std::size_t(h)] = s > tau ? tau / s : 1.0;
          }
          std::vector<double> qf(std::size_t(sh.heads)), kf(std::size_t(sh.kv_heads));
          for (int h = 0; h < sh.heads; ++h) {
            INFO("layer " << l << " q head " << h);
            const double f = std::pow(gamma[std::size_t(h)], alpha);
            const std::size_t o = q.offset + std::size_t(h) * head;
            for (std::size_t i = 0; i < head; ++i)
              REQUIRE(after[o + i] == Approx(p[o + i] * f).epsilon(1e-15).margin(0));
            qf[std::size_t(h)] = after[o] / p[o];
          }
          for (int g = 0; g < sh.kv_heads; ++g) {
            INFO("layer " << l << " kv head " << g);
            double gmin = 1;
            for (int h = 0; h < sh.heads; ++h)
              if (h / group == g) gmin = std::min(gmin, gamma[std::size_t(h)]);
            const double f = std::pow(gmin, 1 - alpha);
            const std::size_t o = k.offset + std::size_t(g) * head;
            for (std::size_t i = 0; i < head; ++i)
              REQUIRE(after[o + i] == Approx(p[o + i] * f).epsilon(1e-15).margin(0));
            kf[std::size_t(g)] = after[o] / p[o];
          }
          // Every head's logits q_h . k_g shrink by at least gamma_h.
          for (int h = 0; h < sh.heads; ++h)
            CHECK(qf[std::size_t(h)] * kf[std::size_t(h / group)] <=
                  gamma[std::size_t(h)] * (1 + 1e-12));
          // v_proj, o_proj untouched, bit for bit.
          for (const char* name : {"v_proj.weight", "o_proj.weight"}) {
            const ParamTensor& t = layout.find(pre + name);
            CHECK(std::memcmp(after.data() + t.offset, p.data() + t.offset,
                              t.numel * sizeof(double)) == 0);
          }
        }
        // Nothing else moved either (every other tensor is bit-identical).
        for (const ParamTensor& t : layout.tensors())
          if (t.role != ParamRole::AttnQ && t.role != ParamRole::AttnK) {
            INFO(t.name);
            CHECK(std::memcmp(after.data() + t.offset, p.data() + t.offset,
                              t.numel * sizeof(double)) == 0);
          }
      }
}

TEST_CASE("MuonClip: no head above tau leaves q and k alone", "[optim]") {
  Config cfg = optim_config(OptimizerName::MuonClip);
  const ParamLayout layout(cfg.model);
  const std::size_t n = layout.total();
  CpuBackend<double> be;
  Optimizer<double> opt(cfg, layout, be);
  const Mat p = random_vector(n, 45, 0.3);
  Device<double> dp(be, p), dg(be, random_vector(n, 46));
  const OptimizerStats st = opt.step(dp.get(), dg.get(), 0.0, {{1, 2, 3, 100}, {99, 0, -5, 7}});
  CHECK(st.clipped_heads == 0);
  CHECK(std::memcmp(dp.download().data(), p.data(), n * sizeof(double)) == 0);
}

TEMPLATE_TEST_CASE("optimizer state round trip continues bit for bit", "[optim]", float, double) {
  using T = TestType;
  const OptimizerName name = GENERATE(OptimizerName::MuonClip, OptimizerName::NorMuon,
                                      OptimizerName::AdaMuon, OptimizerName::Soap);
  INFO(to_string(name));
  Config cfg = optim_config(name);
  cfg.optim.grad_clip = 1.0;
  cfg.optim.qk_clip = true;
  cfg.optim.soap_precondition_frequency = 2;  // the resumed step refreshes SOAP's bases
  const ParamLayout layout(cfg.model);
  const std::size_t n = layout.total();
  const std::vector<std::vector<double>> smax = {{150, 50, 100, 400}, {-3, 250, 120, 99}};
  auto host = [&](std::uint64_t seed, double scale) {
    const Mat v = random_vector(n, seed, scale);
    return std::vector<T>(v.begin(), v.end());
  };
  CpuBackend<T> be;
  Optimizer<T> a(cfg, layout, be);
  Device<T> pa(be, host(51, 0.3)), ga(be, host(52, 1.0));
  for (int s = 0; s < 2; ++s) {
    ga.upload(host(60 + std::uint64_t(s), 0.1));
    a.step(pa.get(), ga.get(), 0.02, smax);
  }
  // Through a file, as a checkpoint would.
  const TempDir tmp("optim_state");
  const std::string path = tmp.file("state.safetensors");
  save_safetensors(path, a.state());
  const TensorMap loaded = load_safetensors(path);

  Optimizer<T> b(cfg, layout, be);
  b.load_state(loaded, path);
  CHECK(b.step_count() == 2);
  Device<T> pb(be, pa.download()), gb(be, host(70, 0.1));
  ga.upload(host(70, 0.1));
  a.step(pa.get(), ga.get(), 0.03, smax);
  b.step(pb.get(), gb.get(), 0.03, smax);
  CHECK(std::memcmp(pa.download().data(), pb.download().data(), n * sizeof(T)) == 0);
  const TensorMap sa = a.state(), sb = b.state();
  REQUIRE(sa.size() == sb.size());
  for (const auto& [name, t] : sa) {
    INFO(name);
    REQUIRE(sb.count(name) == 1);
    CHECK(t.dtype == sb.at(name).dtype);
    CHECK(t.data == sb.at(name).data);
  }
}

TEST_CASE("load_state errors name the source and the tensor", "[optim]") {
  const Config cfg = optim_config(OptimizerName::Muon);
  const ParamLayout layout(cfg.model);
  CpuBackend<double> be;
  Optimizer<double> a(cfg, layout, be);
  const std::size_t n = layout.total();
  Device<double> dp(be, random_vector(n, 81)), dg(be, random_vector(n, 82));
  a.step(dp.get(), dg.get(), 0.01, {});
  const TensorMap good = a.state();
  const std::string src = "run/ckpt/optimizer_rank0.safetensors";
  Optimizer<double> b(cfg, layout, be);
  REQUIRE_NOTHROW(b.load_state(good, src));

  // The first state tensor whose name starts with `prefix`.
  auto first_with = [&](const std::string& prefix) {
    for (const auto& [name, t] : good)
      if (name.rfind(prefix, 0) == 0) return name;
    FAIL("no optimizer state tensor starts with " << prefix);
    return std::string();
  };
  SECTION("missing AdamW moment") {
    TensorMap st = good;
    const std::string name = first_with("adamw.v");
    REQUIRE(st.erase(name) == 1);
    REQUIRE_THROWS_WITH(b.load_state(st, src), Catch::Contains(src) && Catch::Contains(name));
  }
  SECTION("missing Muon momentum") {
    TensorMap st = good;
    const std::string name = "muon.momentum.layers.1.moe.experts.2.w2.weight";
    REQUIRE(st.erase(name) == 1);
    REQUIRE_THROWS_WITH(b.load_state(st, src), Catch::Contains(src) && Catch::Contains(name));
  }
  SECTION("wrong size") {
    TensorMap st = good;
    const std::string name = "muon.momentum.layers.0.attn.k_proj.weight";
    const double three[3] = {1, 2, 3};
    st[name] = HostTensor::f64({3}, three);
    REQUIRE_THROWS_WITH(b.load_state(st, src), Catch::Contains(src) && Catch::Contains(name));
  }
  SECTION("missing step counter") {
    TensorMap st = good;
    REQUIRE(st.erase("step") == 1);
    REQUIRE_THROWS_WITH(b.load_state(st, src), Catch::Contains(src) && Catch::Contains("step"));
  }
  SECTION("state of another optimizer (adamw state into muon)") {
    Config ac = cfg;
    ac.optim.name = OptimizerName::AdamW;
    Optimizer<double> adam(ac, layout, be);
    REQUIRE_THROWS_WITH(b.load_state(adam.state(), src), Catch::Contains(src));
  }
  SECTION("integer dtype where floats are expected") {
    // docs/design.md §12: a bad checkpoint gets an error naming the file and the field.
    TensorMap st = good;
    const std::string name = first_with("adamw.m");
    const std::vector<std::int32_t> ints(st.at(name).numel(), 1);
    st[name] = HostTensor::i32({std::int64_t(ints.size())}, ints.data());
    REQUIRE_THROWS_WITH(b.load_state(st, src), Catch::Contains(src) && Catch::Contains(name));
  }
}

TEST_CASE("a non-finite gradient throws and changes nothing", "[optim]") {
  const OptimizerName name = GENERATE(OptimizerName::MuonClip, OptimizerName::NorMuon,
                                      OptimizerName::AdaMuon, OptimizerName::Soap);
  INFO(to_string(name));
  Config cfg = optim_config(name);
  cfg.optim.qk_clip = true;
  cfg.optim.soap_precondition_frequency = 1;
  cfg.optim.grad_clip = 1.0;
  const ParamLayout layout(cfg.model);
  const std::size_t n = layout.total();
  const std::vector<std::vector<double>> smax = {{150, 50, 100, 400}, {-3, 250, 120, 99}};
  const ParamTensor& q = layout.find("layers.0.attn.q_proj.weight");
  const ParamTensor& e = layout.find("embed.weight");
  for (const std::size_t bad : {q.offset + 5, e.offset + 3})
    for (const double value :
         {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
      INFO("index " << bad << " value " << value);
      CpuBackend<double> be;
      Optimizer<double> opt(cfg, layout, be);
      const Mat p = random_vector(n, 91, 0.3);
      Mat g = random_vector(n, 92, 0.1);
      g[bad] = value;
      Device<double> dp(be, p), dg(be, g);
      REQUIRE_THROWS_AS(opt.step(dp.get(), dg.get(), 0.05, smax), std::runtime_error);
      CHECK(std::memcmp(dp.download().data(), p.data(), n * sizeof(double)) == 0);
      CHECK(opt.step_count() == 0);
      // The optimizer is still usable: the next finite step is a fresh optimizer's first step.
      const Mat good = random_vector(n, 93, 0.1), good2 = random_vector(n, 94, 0.1);
      dg.upload(good);
      opt.step(dp.get(), dg.get(), 0.05, smax);
      // A later bad step leaves parameters and state (SOAP: factors, bases, with a refresh due)
      // as they were, too.
      const Mat p1 = dp.download();
      const TensorMap s1 = opt.state();
      dg.upload(g);
      REQUIRE_THROWS_AS(opt.step(dp.get(), dg.get(), 0.05, smax), std::runtime_error);
      CHECK(std::memcmp(dp.download().data(), p1.data(), n * sizeof(double)) == 0);
      const TensorMap s2 = opt.state();
      REQUIRE(s2.size() == s1.size());
      for (const auto& [key, t] : s1) {
        INFO(key);
        CHECK(s2.at(key).data == t.data);
      }
      dg.upload(good2);
      opt.step(dp.get(), dg.get(), 0.05, smax);
      Optimizer<double> fresh(cfg, layout, be);
      Device<double> fp(be, p), fg(be, good);
      fresh.step(fp.get(), fg.get(), 0.05, smax);
      fg.upload(good2);
      fresh.step(fp.get(), fg.get(), 0.05, smax);
      CHECK(std::memcmp(dp.download().data(), fp.download().data(), n * sizeof(double)) == 0);
    }
}

TEST_CASE("update_rms_muon and update_rms_adamw match their definitions", "[optim]") {
  // From the observed change of each weight: lr_t * u = W_old - W_new - lr_t * wd * W_old, so
  // u = (W_old - W_new) / lr_t - wd * W_old is s*O (Muon) or m_hat / (sqrt(v_hat) + eps) (AdamW).
  Config cfg = optim_config(OptimizerName::Muon);
  const ParamLayout layout(cfg.model);
  const std::size_t n = layout.total();
  CpuBackend<double> be;
  Optimizer<double> opt(cfg, layout, be);
  const Mat p0 = random_vector(n, 101, 0.3);
  Device<double> dp(be, p0), dg(be, Mat(n, 0.0));
  Mat before = p0;
  const double lr = 0.02;
  for (int s = 0; s < 2; ++s) {
    dg.upload(random_vector(n, 110 + std::uint64_t(s), 0.1));
    const OptimizerStats st = opt.step(dp.get(), dg.get(), lr, {});
    const Mat after = dp.download();
    double sq_m = 0, sq_a = 0;
    std::size_t n_m = 0, n_a = 0;
    for (const ParamTensor& t : layout.tensors()) {
      const bool muon = hidden_role(t.role);
      const GroupConfig& gc = muon ? cfg.optim.muon_group : cfg.optim.adamw_group;
      const double lr_t = lr * gc.lr_scale;
      const double wd = t.role == ParamRole::Norm ? 0.0 : gc.weight_decay;
      for (std::size_t i = t.offset; i < t.offset + t.numel; ++i) {
        const double u = (before[i] - after[i]) / lr_t - wd * before[i];
        (muon ? sq_m : sq_a) += u * u;
      }
      (muon ? n_m : n_a) += t.numel;
    }
    CHECK(st.update_rms_muon == Approx(std::sqrt(sq_m / double(n_m))).epsilon(1e-9));
    CHECK(st.update_rms_adamw == Approx(std::sqrt(sq_a / double(n_a))).epsilon(1e-9));
    // match_rms_adamw: each s*O has RMS about 0.2 (singular values near 1).
    CHECK(st.update_rms_muon > 0.1);
    CHECK(st.update_rms_muon < 0.3);
    before = after;
  }
}

TEST_CASE("finish_step refuses sums of another length than its own", "[optim]") {
  const Config cfg = optim_config(OptimizerName::MuonClip);
  const ParamLayout layout(cfg.model);
  CpuBackend<double> be;
  Optimizer<double> opt(cfg, layout, be);
  const std::size_t n = opt.local_sums().size();
  REQUIRE(n > 0);
  CHECK_THROWS_WITH(
      opt.finish_step(std::vector<double>(n + 1, 0.0)),
      "Optimizer::finish_step: " + std::to_string(n + 1) + " sums, expected " + std::to_string(n));
}
