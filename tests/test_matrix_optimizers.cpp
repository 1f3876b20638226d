// NorMuon, AdaMuon and SOAP (src/optim/normuon.cpp, adamuon.cpp, soap.cpp) against the test
// properties of ../shared/OPTIMIZERS.md §2-4, observed through the public Optimizer in double
// precision: each update is read off the change of the weights, each state from state(), and
// compared with Muon's update, with closed-form values, or with formulas written out here.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "gradcheck.hpp"
#include "moetrain/cpu_backend.hpp"
#include "moetrain/optimizer.hpp"
#include "moetrain/param_layout.hpp"
#include "test_util.hpp"

using namespace moetrain;
using namespace moetrain::test;

namespace {

using Mat = std::vector<double>;

// The matrix group has tall ([12, 8] q_proj, [10, 8] dense w1/w3), wide ([6, 8] k/v, [8, 12]
// o_proj, [5, 8] expert w1/w3) and [8, 5] matrices.
Config matrix_config(OptimizerName name) {
  Config c;
  c.model = tiny_model({.vocab = 11, .layers = 2, .heads = 4, .kv_heads = 2, .experts = 3});
  c.model.head_dim = 3;
  c.optim.name = name;
  c.optim.grad_clip = 0;
  c.optim.muon_group.lr_scale = 0.5;
  c.optim.muon_group.weight_decay = 0;  // the properties are of the update itself
  c.optim.momentum = 0.9;
  c.optim.muon_scale = MuonScale::Original;
  c.optim.normuon_scale = MuonScale::Original;
  c.optim.normuon_beta2 = 0.8;
  return c;
}

// The gradients Muon sees to give NorMuon's Newton-Schulz output: NorMuon's reference momentum
// (a lerp) is (1 - mu) times Muon's, and the normalisation's epsilon sees the difference.
std::vector<Mat> muon_equivalent(const Config& c, std::vector<Mat> g) {
  for (Mat& x : g)
    for (double& v : x) v *= 1 - c.optim.momentum;
  return g;
}

bool is_matrix(const ParamTensor& t) {
  return is_hidden_matrix(t.role);
}

// Steps of `cfg`'s optimizer from p0 with the gradients `grads` (one per step); returns the
// parameters after each step.
struct Run {
  std::vector<Mat> params;  // after each step
  TensorMap state;          // after the last
};
Run run(const Config& cfg, const Mat& p0, const std::vector<Mat>& grads, double lr) {
  const ParamLayout layout(cfg.model);
  CpuBackend<double> be;
  Optimizer<double> opt(cfg, layout, be);
  DeviceBuffer<double, double> p(be, p0.size()), g(be, p0.size());
  be.upload(p.get(), p0.data(), p0.size() * sizeof(double));
  Run r;
  for (const Mat& gr : grads) {
    be.upload(g.get(), gr.data(), gr.size() * sizeof(double));
    opt.step(p.get(), g.get(), lr, {});
    Mat now(p0.size());
    be.download(now.data(), p.get(), now.size() * sizeof(double));
    r.params.push_back(std::move(now));
  }
  r.state = opt.state();
  return r;
}

Mat slice(const Mat& v, const ParamTensor& t) {
  return Mat(v.begin() + std::ptrdiff_t(t.offset), v.begin() + std::ptrdiff_t(t.offset + t.numel));
}
// (a - b) / scale over tensor t.
Mat delta(const Mat& a, const Mat& b, const ParamTensor& t, double scale = 1.0) {
  Mat d(t.numel);
  for (std::size_t i = 0; i < t.numel; ++i) d[i] = (a[t.offset + i] - b[t.offset + i]) / scale;
  return d;
}
double norm(const Mat& x) {
  double s = 0;
  for (double v : x) s += v * v;
  return std::sqrt(s);
}
double rel(double a, double b) {
  return std::abs(a - b) / std::max(std::abs(b), 1e-300);
}
double rel_l2(const Mat& a, const Mat& b) {
  Mat d(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) d[i] = a[i] - b[i];
  return norm(d) / std::max(norm(b), 1e-300);
}
// max |Q^T Q - I| of an n x n matrix.
double orthogonality_error(const Mat& q, int n) {
  const Mat qtq = matmul(transpose(q, n, n), q, n, n, n);
  double e = 0;
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) e = std::max(e, std::abs(qtq[std::size_t(i * n + j)] - (i == j)));
  return e;
}
Mat state_of(const TensorMap& st, const std::string& name) {
  REQUIRE(st.count(name) == 1);
  return st.at(name).to_f64();
}

}  // namespace

TEST_CASE("NorMuon: the first step keeps Muon's Frobenius norm with equal row norms",
          "[optim][normuon]") {
  // With v = (1 - beta2) r on step 1, every row of O / sqrt(v) has norm sqrt(B / (1 - beta2)):
  // after the rescale to ||O||_F each row has ||O||_F / sqrt(A). Muon's update (same scale) is
  // s O, so NorMuon's has Muon's norm, and v is (1 - beta2) times the row mean squares of O.
  const Config nc = matrix_config(OptimizerName::NorMuon);
  const Config mc = matrix_config(OptimizerName::Muon);
  const ParamLayout layout(nc.model);
  const Mat p0 = random_vector(layout.total(), 3, 0.3);
  const std::vector<Mat> g = {random_vector(layout.total(), 4, 0.1)};
  const double lr = 0.02, lr_t = lr * nc.optim.muon_group.lr_scale;
  const Run n = run(nc, p0, g, lr), m = run(mc, p0, muon_equivalent(mc, g), lr);
  int checked = 0;
  for (const ParamTensor& t : layout.tensors()) {
    if (!is_matrix(t)) continue;
    INFO(t.name);
    const int A = int(t.shape[0]), B = int(t.shape[1]);
    const double s = std::sqrt(std::max(1.0, double(A) / B));
    const Mat dn = delta(p0, n.params[0], t, lr_t * s), O = delta(p0, m.params[0], t, lr_t * s);
    CHECK(rel(norm(dn), norm(O)) < 1e-9);
    const Mat v = state_of(n.state, "normuon.v." + t.name);
    REQUIRE(v.size() == std::size_t(A));
    for (int r = 0; r < A; ++r) {
      double row = 0, orow = 0;
      for (int c = 0; c < B; ++c) {
        row += dn[std::size_t(r * B + c)] * dn[std::size_t(r * B + c)];
        orow += O[std::size_t(r * B + c)] * O[std::size_t(r * B + c)];
      }
      CHECK(rel(std::sqrt(row), norm(O) / std::sqrt(A)) < 1e-8);
      CHECK(rel(v[std::size_t(r)], (1 - nc.optim.normuon_beta2) * orow / B) < 1e-9);
    }
    ++checked;
  }
  CHECK(checked > 10);
}

TEST_CASE("NorMuon: rows of equal norm give exactly Muon's update", "[optim][normuon]") {
  // k_proj [6, 8] gets c times 6 orthonormal rows: Newton-Schulz maps its equal singular values
  // alike, so the rows of O have equal norms and the row normalisation changes nothing.
  const Config nc = matrix_config(OptimizerName::NorMuon);
  const Config mc = matrix_config(OptimizerName::Muon);
  const ParamLayout layout(nc.model);
  const ParamTensor& k = layout.find("layers.0.attn.k_proj.weight");
  REQUIRE(k.shape[0] == 6);
  REQUIRE(k.shape[1] == 8);
  // Gram-Schmidt on random rows.
  Mat rows = random_vector(48, 7, 1.0);
  for (int i = 0; i < 6; ++i) {
    for (int j = 0; j < i; ++j) {
      double d = 0;
      for (int c = 0; c < 8; ++c) d += rows[std::size_t(i * 8 + c)] * rows[std::size_t(j * 8 + c)];
      for (int c = 0; c < 8; ++c) rows[std::size_t(i * 8 + c)] -= d * rows[std::size_t(j * 8 + c)];
    }
    double nr = 0;
    for (int c = 0; c < 8; ++c) nr += rows[std::size_t(i * 8 + c)] * rows[std::size_t(i * 8 + c)];
    for (int c = 0; c < 8; ++c) rows[std::size_t(i * 8 + c)] /= std::sqrt(nr);
  }
  Mat g = random_vector(layout.total(), 8, 0.1);
  for (std::size_t i = 0; i < k.numel; ++i) g[k.offset + i] = 0.37 * rows[i];
  const Mat p0 = random_vector(layout.total(), 9, 0.3);
  const Run n = run(nc, p0, {g}, 0.02), m = run(mc, p0, muon_equivalent(mc, {g}), 0.02);
  const Mat dn = delta(p0, n.params[0], k), dm = delta(p0, m.params[0], k);
  INFO("relative difference " << rel_l2(dn, dm));
  CHECK(rel_l2(dn, dm) < 1e-9);
  // Elsewhere the rows differ, and so do the updates.
  const ParamTensor& q = layout.find("layers.0.attn.q_proj.weight");
  CHECK(rel_l2(delta(p0, n.params[0], q), delta(p0, m.params[0], q)) > 1e-3);
}

TEST_CASE("NorMuon match_rms_adamw: every step's update has RMS 0.2 lr", "[optim][normuon]") {
  Config nc = matrix_config(OptimizerName::NorMuon);
  nc.optim.normuon_scale = MuonScale::MatchRmsAdamW;
  const ParamLayout layout(nc.model);
  const Mat p0 = random_vector(layout.total(), 11, 0.3);
  const std::vector<Mat> g = {random_vector(layout.total(), 12, 0.1),
                              random_vector(layout.total(), 13, 0.1)};
  const double lr = 0.02, lr_t = lr * nc.optim.muon_group.lr_scale;
  const Run n = run(nc, p0, g, lr);
  for (const ParamTensor& t : layout.tensors()) {
    if (!is_matrix(t)) continue;
    INFO(t.name);
    for (int s = 0; s < 2; ++s) {
      const Mat d = delta(s ? n.params[0] : p0, n.params[std::size_t(s)], t, lr_t);
      CHECK(rel(norm(d) / std::sqrt(double(t.numel)), 0.2) < 1e-8);
    }
  }
}

TEST_CASE("AdaMuon: the first step is 0.2 lr sign(O), every step has RMS 0.2 lr",
          "[optim][adamuon]") {
  // Step 1: V = (1 - mu) O^2, so O / sqrt(V) = sign(O) / sqrt(1 - mu), rescaled to RMS 0.2.
  Config ac = matrix_config(OptimizerName::AdaMuon);
  ac.optim.eps = 1e-30;  // so that no element of O is small against it
  const ParamLayout layout(ac.model);
  const Mat p0 = random_vector(layout.total(), 21, 0.3);
  const std::vector<Mat> g = {random_vector(layout.total(), 22, 0.1),
                              random_vector(layout.total(), 23, 0.1),
                              random_vector(layout.total(), 24, 0.1)};
  const double lr = 0.02, lr_t = lr * ac.optim.muon_group.lr_scale;
  const Run a = run(ac, p0, g, lr);
  for (const ParamTensor& t : layout.tensors()) {
    if (!is_matrix(t)) continue;
    INFO(t.name);
    const Mat d1 = delta(p0, a.params[0], t, lr_t);
    for (double x : d1) CHECK(rel(std::abs(x), 0.2) < 1e-9);
    for (int s = 1; s < 3; ++s) {
      const Mat d = delta(a.params[std::size_t(s - 1)], a.params[std::size_t(s)], t, lr_t);
      CHECK(rel(norm(d) / std::sqrt(double(t.numel)), 0.2) < 1e-9);
      // Later steps are not sign matrices: the second moment has history.
      if (s == 2)
        CHECK(
            std::any_of(d.begin(), d.end(), [](double x) { return rel(std::abs(x), 0.2) > 1e-3; }));
    }
  }
}

TEST_CASE("AdaMuon: scaling every gradient by c > 0 leaves the updates unchanged",
          "[optim][adamuon]") {
  const Config ac = matrix_config(OptimizerName::AdaMuon);
  const ParamLayout layout(ac.model);
  const Mat p0 = random_vector(layout.total(), 31, 0.3);
  std::vector<Mat> g = {random_vector(layout.total(), 32, 0.1),
                        random_vector(layout.total(), 33, 0.1)};
  std::vector<Mat> scaled = g;
  for (Mat& x : scaled)
    for (double& v : x) v *= 7.25;
  const Run a = run(ac, p0, g, 0.02), b = run(ac, p0, scaled, 0.02);
  for (const ParamTensor& t : layout.tensors()) {
    if (!is_matrix(t)) continue;
    INFO(t.name);
    CHECK(rel_l2(delta(p0, b.params[1], t), delta(p0, a.params[1], t)) < 1e-12);
  }
}

TEST_CASE("SOAP: the first step only builds L, R and their eigenbases", "[optim][soap]") {
  Config sc = matrix_config(OptimizerName::Soap);
  sc.optim.muon_group.weight_decay = 0.1;  // not applied either
  const ParamLayout layout(sc.model);
  const Mat p0 = random_vector(layout.total(), 41, 0.3);
  const Mat g = random_vector(layout.total(), 42, 0.1);
  const Run s = run(sc, p0, {g}, 0.02);
  const double bs = sc.optim.soap_beta2;  // shampoo_beta -1: beta2
  int matrices = 0;
  for (const ParamTensor& t : layout.tensors()) {
    INFO(t.name);
    const Mat after = slice(s.params[0], t), before = slice(p0, t);
    if (!is_matrix(t)) {
      CHECK(after != before);  // AdamW steps from the first step
      continue;
    }
    ++matrices;
    CHECK(after == before);
    const int A = int(t.shape[0]), B = int(t.shape[1]);
    const Mat G = slice(g, t);
    for (const auto& [side, n, P] : {std::tuple{"L", A, matmul(G, transpose(G, A, B), A, B, A)},
                                     std::tuple{"R", B, matmul(transpose(G, A, B), G, B, A, B)}}) {
      INFO(side);
      const Mat L = state_of(s.state, std::string("soap.") + side + "." + t.name);
      Mat expect = P;
      for (double& x : expect) x *= 1 - bs;
      CHECK(rel_l2(L, expect) < 1e-12);
      const Mat Q = state_of(s.state, std::string("soap.Q") + side + "." + t.name);
      CHECK(orthogonality_error(Q, n) < 1e-12);
      // L Q = Q diag(lambda), lambda = diag(Q^T L Q) descending.
      const Mat LQ = matmul(L, Q, n, n, n);
      const Mat D = matmul(transpose(Q, n, n), LQ, n, n, n);
      double off = 0, scale = 0;
      for (int i = 0; i < n; ++i)
        for (int j = 0; j < n; ++j) {
          const double x = D[std::size_t(i * n + j)];
          (i == j ? scale : off) = std::max(i == j ? scale : off, std::abs(x));
        }
      CHECK(off <= 1e-12 * scale);
      for (int j = 1; j < n; ++j)
        CHECK(D[std::size_t(j * n + j)] <= D[std::size_t((j - 1) * n + j - 1)] + 1e-15 * scale);
    }
  }
  CHECK(matrices > 10);
}

TEST_CASE("SOAP: the second step is lr sign(G~) rotated back, of RMS lr", "[optim][soap]") {
  // m = (1 - b1) G, v = (1 - b2) G~^2 and the bias correction sqrt(1 - b2) / (1 - b1): the rotated
  // step is sign(G~), and rotations keep its Frobenius norm.
  Config sc = matrix_config(OptimizerName::Soap);
  sc.optim.eps = 1e-30;
  const ParamLayout layout(sc.model);
  const Mat p0 = random_vector(layout.total(), 51, 0.3);
  const std::vector<Mat> g = {random_vector(layout.total(), 52, 0.1),
                              random_vector(layout.total(), 53, 0.1)};
  const double lr = 0.02, lr_t = lr * sc.optim.muon_group.lr_scale;
  const Run s = run(sc, p0, g, lr);
  for (const ParamTensor& t : layout.tensors()) {
    if (!is_matrix(t)) continue;
    INFO(t.name);
    const Mat d = delta(s.params[0], s.params[1], t, lr_t);
    CHECK(rel(norm(d) / std::sqrt(double(t.numel)), 1.0) < 1e-9);
    // And it is Q_L sign(Q_L^T G Q_R) Q_R^T with the bases of the first step.
    const int A = int(t.shape[0]), B = int(t.shape[1]);
    const Mat QL = state_of(s.state, "soap.QL." + t.name),
              QR = state_of(s.state, "soap.QR." + t.name);
    const Mat Gt = matmul(matmul(transpose(QL, A, A), slice(g[1], t), A, A, B), QR, A, B, B);
    Mat sg(Gt.size());
    for (std::size_t i = 0; i < Gt.size(); ++i) sg[i] = (Gt[i] > 0) - (Gt[i] < 0);
    const Mat N = matmul(matmul(QL, sg, A, A, B), transpose(QR, B, B), A, B, B);
    CHECK(rel_l2(d, N) < 1e-9);
  }
}

TEST_CASE("SOAP with no rotated side is AdamW on the gradients after the first", "[optim][soap]") {
  // soap_max_precond_dim below every side: Q = I. Then SOAP is Adam with the decay after the step,
  // W = (W - lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)) (1 - lr wd), t = 1, 2, ... from
  // the second gradient (the first only initialises).
  Config sc = matrix_config(OptimizerName::Soap);
  sc.optim.soap_max_precond_dim = 1;
  sc.optim.muon_group.weight_decay = 0.3;
  sc.optim.soap_beta1 = 0.8;
  sc.optim.soap_beta2 = 0.9;
  sc.optim.eps = 1e-3;
  const ParamLayout layout(sc.model);
  const Mat p0 = random_vector(layout.total(), 61, 0.3);
  std::vector<Mat> g;
  for (int i = 0; i < 4; ++i)
    g.push_back(random_vector(layout.total(), 62 + std::uint64_t(i), 0.1));
  const double lr = 0.02, lr_t = lr * sc.optim.muon_group.lr_scale, wd = 0.3;
  const Run s = run(sc, p0, g, lr);
  const OptimConfig& o = sc.optim;
  for (const ParamTensor& t : layout.tensors()) {
    if (!is_matrix(t)) continue;
    INFO(t.name);
    Mat w = slice(p0, t), m(t.numel, 0.0), v(t.numel, 0.0);
    for (int step = 1; step < 4; ++step) {
      const Mat gr = slice(g[std::size_t(step)], t);
      const double c =
          std::sqrt(1 - std::pow(o.soap_beta2, step)) / (1 - std::pow(o.soap_beta1, step));
      for (std::size_t i = 0; i < t.numel; ++i) {
        m[i] = o.soap_beta1 * m[i] + (1 - o.soap_beta1) * gr[i];
        v[i] = o.soap_beta2 * v[i] + (1 - o.soap_beta2) * gr[i] * gr[i];
        w[i] = (w[i] - lr_t * c * m[i] / (std::sqrt(v[i]) + o.eps)) * (1 - lr_t * wd);
      }
      CHECK(rel_l2(slice(s.params[std::size_t(step)], t), w) < 1e-12);
    }
    CHECK(s.state.count("soap.QL." + t.name) == 0);
  }
}

TEST_CASE("SOAP: the bases stay orthogonal through refreshes", "[optim][soap]") {
  Config sc = matrix_config(OptimizerName::Soap);
  sc.optim.soap_precondition_frequency = 2;
  const ParamLayout layout(sc.model);
  const Mat p0 = random_vector(layout.total(), 71, 0.3);
  std::vector<Mat> g;
  for (int i = 0; i < 6; ++i)
    g.push_back(random_vector(layout.total(), 72 + std::uint64_t(i), 0.1));
  const Run s = run(sc, p0, g, 0.02);
  std::vector<Run> prefix;  // after 1, 2, ..., 5 steps
  for (std::size_t k = 1; k <= 5; ++k)
    prefix.push_back(run(sc, p0, std::vector<Mat>(g.begin(), g.begin() + std::ptrdiff_t(k)), 0.02));
  for (const ParamTensor& t : layout.tensors()) {
    if (!is_matrix(t)) continue;
    INFO(t.name);
    for (const auto& [side, n] :
         {std::pair{"QL", int(t.shape[0])}, std::pair{"QR", int(t.shape[1])}})
      CHECK(orthogonality_error(state_of(s.state, std::string("soap.") + side + "." + t.name), n) <
            1e-12);
    // Refreshes at the reference's steps 2 and 4 (optimizer steps 3 and 5) only.
    std::vector<Mat> q;
    for (const Run& r : prefix) q.push_back(state_of(r.state, "soap.QL." + t.name));
    q.push_back(state_of(s.state, "soap.QL." + t.name));
    CHECK(q[1] == q[0]);
    CHECK(q[2] != q[1]);
    CHECK(q[3] == q[2]);
    CHECK(q[4] != q[3]);
    CHECK(q[5] == q[4]);
  }
}
