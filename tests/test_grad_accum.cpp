// Gradient accumulation and padding, in double (docs/design.md §3, §4): what the trainer relies on
// when it splits a batch into micro-batches, and when targets carry padding (-1).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "gradcheck.hpp"
#include "moetrain/cpu_backend.hpp"
#include "moetrain/model.hpp"
#include "test_util.hpp"

using namespace moetrain;
using namespace moetrain::test;

namespace {

ModelConfig accum_config(RouterType router, int seq_len = 6) {
  ModelConfig c =
      tiny_model({.vocab = 19, .d_model = 12, .seq = seq_len, .expert_ff = 8, .shared_ff = 5});
  c.head_dim = 3;  // odd: the model takes it, a config file may not
  c.init_std = 0.3;
  c.moe.router = router;
  c.moe.route_scale = router == RouterType::SigmoidBias ? 2.0 : 1.0;
  c.moe.aux_loss_coef = 0.0;
  c.moe.z_loss_coef = 0.02;
  return c;
}

std::vector<double> grads_of(Model<double>& m) {
  std::vector<double> g(m.layout().total());
  m.backend().download(g.data(), m.grads(), g.size() * sizeof(double));
  return g;
}

std::vector<double> params_of(Model<double>& m) {
  std::vector<double> p(m.layout().total());
  m.backend().download(p.data(), m.params(), p.size() * sizeof(double));
  return p;
}

void set_params(Model<double>& m, const std::vector<double>& p) {
  m.backend().upload(m.params(), p.data(), p.size() * sizeof(double));
}

double relative_error(const std::vector<double>& a, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - ref[i]) * (a[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  // An expert that no token chose has an all-zero gradient in both: compare absolutely then.
  return den > 0 ? std::sqrt(num) / std::sqrt(den) : std::sqrt(num);
}

std::vector<std::int32_t> random_tokens(std::size_t n, int vocab, std::uint64_t seed) {
  Rng rng(seed);
  std::vector<std::int32_t> t(n);
  for (auto& x : t) x = std::int32_t(rng.below(std::uint64_t(vocab)));
  return t;
}

// Sequence b of a [B, T] host batch.
std::vector<std::int32_t> row(const std::vector<std::int32_t>& v, int b, int T) {
  return std::vector<std::int32_t>(v.begin() + std::ptrdiff_t(b) * T,
                                   v.begin() + std::ptrdiff_t(b + 1) * T);
}

}  // namespace

TEST_CASE("gradient accumulation: batch 2 equals two micro-batches of 1 at grad_scale 1/2",
          "[optim]") {
  // The objective is CE (mean over the batch's tokens) + z_coef * L_z (mean over tokens) per MoE
  // layer; both are means over equally sized micro-batches, so the mean of the micro-batch
  // objectives is the batch objective and grad_scale 1/2 on each adds up to the batch gradient.
  // The Switch aux loss E * sum_e f_e P_e is a product of two batch means: the product of the
  // means is not the mean of the per-micro-batch products, so it is not additive over
  // micro-batches and aux_loss_coef is 0 here (that is the documented approximation of gradient
  // accumulation with an aux loss, as in Megatron and HF).
  for (const RouterType router : {RouterType::SoftmaxTopK, RouterType::SigmoidBias}) {
    INFO((router == RouterType::SoftmaxTopK ? "softmax_topk" : "sigmoid_bias"));
    const ModelConfig cfg = accum_config(router);
    REQUIRE(cfg.moe.z_loss_coef > 0);
    const int T = cfg.seq_len;
    CpuBackend<double> be;
    Model<double> full(cfg, be, 2), micro(cfg, be, 1);
    full.init_weights(7);
    set_params(micro, params_of(full));
    const auto bias = random_vector(std::size_t(cfg.n_layers) * cfg.moe.n_experts, 8, 0.1);
    full.load_expert_bias_state(expert_bias_rows(bias, std::size_t(cfg.n_layers)), "test");
    micro.load_expert_bias_state(expert_bias_rows(bias, std::size_t(cfg.n_layers)), "test");

    const auto tok = random_tokens(std::size_t(2 * T), cfg.vocab_size, 11);
    const auto tgt = random_tokens(std::size_t(2 * T), cfg.vocab_size, 12);

    full.zero_grads();
    const ForwardStats fs = full.forward_backward(tok.data(), tgt.data(), 1.0);
    const double full_objective = fs.objective, full_ce_sum = fs.ce_sum;
    const std::vector<double> g_full = grads_of(full);

    micro.zero_grads();
    double objective = 0, ce_sum = 0;
    std::int64_t ce_tokens = 0;
    for (int b = 0; b < 2; ++b) {
      const auto tk = row(tok, b, T), tg = row(tgt, b, T);
      const ForwardStats& s = micro.forward_backward(tk.data(), tg.data(), 0.5);
      objective += 0.5 * s.objective;
      ce_sum += s.ce_sum;
      ce_tokens += s.ce_tokens;
    }
    const std::vector<double> g_micro = grads_of(micro);

    CHECK(objective == Approx(full_objective).epsilon(1e-12));
    CHECK(ce_sum == Approx(full_ce_sum).epsilon(1e-12));
    CHECK(ce_tokens == 2 * T);
    CHECK(relative_error(g_micro, g_full) < 1e-10);
    // And tensor by tensor, so that a small tensor (a norm gain, a router) cannot hide.
    std::vector<std::string> mismatched;
    for (const ParamTensor& t : full.layout().tensors()) {
      const std::vector<double> a(g_micro.begin() + std::ptrdiff_t(t.offset),
                                  g_micro.begin() + std::ptrdiff_t(t.offset + t.numel));
      const std::vector<double> r(g_full.begin() + std::ptrdiff_t(t.offset),
                                  g_full.begin() + std::ptrdiff_t(t.offset + t.numel));
      if (!(relative_error(a, r) < 1e-10)) mismatched.push_back(t.name);
    }
    CHECK(mismatched == std::vector<std::string>{});
  }
}

TEST_CASE("padding: targets -1 at the end of each sequence equal a shorter sequence", "[optim]") {
  // Causal attention makes positions < T0 independent of later tokens, and routing is per
  // token, so with the target-independent router losses off (aux and z are means over all
  // tokens, padded or not) the loss of a batch whose targets are -1 from position T0 on is
  // exactly the loss of the same batch cut to length T0: an independent model of seq_len T0
  // with the same weights gives the reference gradient.
  ModelConfig cfg = accum_config(RouterType::SoftmaxTopK, 7);
  cfg.moe.z_loss_coef = 0;
  const int T = cfg.seq_len, T0 = 4, B = 2;
  ModelConfig short_cfg = cfg;
  short_cfg.seq_len = T0;
  CpuBackend<double> be;
  Model<double> padded(cfg, be, B), cut(short_cfg, be, B);
  padded.init_weights(21);
  set_params(cut, params_of(padded));

  const auto tok = random_tokens(std::size_t(B * T), cfg.vocab_size, 31);
  auto tgt = random_tokens(std::size_t(B * T), cfg.vocab_size, 32);
  std::vector<std::int32_t> tok_cut, tgt_cut;
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t) {
      const std::size_t i = std::size_t(b * T + t);
      if (t < T0) {
        tok_cut.push_back(tok[i]);
        tgt_cut.push_back(tgt[i]);
      } else {
        tgt[i] = -1;
      }
    }

  padded.zero_grads();
  const ForwardStats& sp = padded.forward_backward(tok.data(), tgt.data(), 1.0);
  const double ce_p = sp.ce, ce_sum_p = sp.ce_sum;
  const std::int64_t tokens_p = sp.ce_tokens;
  cut.zero_grads();
  const ForwardStats& sc = cut.forward_backward(tok_cut.data(), tgt_cut.data(), 1.0);
  CHECK(tokens_p == B * T0);
  CHECK(sc.ce_tokens == B * T0);
  CHECK(ce_sum_p == Approx(sc.ce_sum).epsilon(1e-12));
  CHECK(ce_p == Approx(sc.ce).epsilon(1e-12));
  CHECK(ce_p == Approx(ce_sum_p / (B * T0)).epsilon(1e-14));
  CHECK(relative_error(grads_of(padded), grads_of(cut)) < 1e-10);
}

TEST_CASE("padding: masking a partition of the targets adds up to the unmasked gradient",
          "[optim]") {
  // With S1, S2 a partition of the N positions, g(S) the gradient with every target outside S
  // set to -1 and R the router losses (which do not depend on targets):
  //   g(S) = grad(sum_{i in S} ce_i) / |S| + grad R,
  // so |S1|/N g(S1) + |S2|/N g(S2) = grad(sum_i ce_i) / N + grad R = g(all). This holds only if
  // a padded position contributes nothing and CE is averaged over the valid targets only; it
  // holds for any aux and z coefficients. The padded positions are scattered, not just at the
  // end of a sequence.
  ModelConfig cfg = accum_config(RouterType::SigmoidBias, 6);
  cfg.moe.aux_loss_coef = 0.05;
  cfg.moe.z_loss_coef = 0.01;
  const int B = 2, N = B * cfg.seq_len;
  CpuBackend<double> be;
  Model<double> m(cfg, be, B);
  m.init_weights(41);
  const auto tok = random_tokens(std::size_t(N), cfg.vocab_size, 51);
  const auto tgt = random_tokens(std::size_t(N), cfg.vocab_size, 52);
  std::vector<std::int32_t> t1 = tgt, t2 = tgt;
  int n1 = 0;
  for (int i = 0; i < N; ++i) {
    const bool in_s1 = (i * 7) % 5 < 2;  // a scattered subset
    (in_s1 ? t2 : t1)[std::size_t(i)] = -1;
    n1 += in_s1;
  }
  const int n2 = N - n1;
  REQUIRE(n1 > 0);
  REQUIRE(n2 > 0);

  m.zero_grads();
  const ForwardStats& all = m.forward_backward(tok.data(), tgt.data(), 1.0);
  const double ce_sum_all = all.ce_sum, objective_all = all.objective;
  CHECK(all.ce_tokens == N);
  const std::vector<double> g_all = grads_of(m);

  m.zero_grads();
  const ForwardStats& s1 = m.forward_backward(tok.data(), t1.data(), double(n1) / N);
  const double ce_sum_1 = s1.ce_sum, ce_1 = s1.ce, objective_1 = s1.objective;
  CHECK(s1.ce_tokens == n1);
  CHECK(ce_1 == Approx(ce_sum_1 / n1).epsilon(1e-14));
  const ForwardStats& s2 = m.forward_backward(tok.data(), t2.data(), double(n2) / N);
  CHECK(s2.ce_tokens == n2);
  CHECK(ce_sum_1 + s2.ce_sum == Approx(ce_sum_all).epsilon(1e-12));
  CHECK(double(n1) / N * objective_1 + double(n2) / N * s2.objective ==
        Approx(objective_all).epsilon(1e-12));
  CHECK(relative_error(grads_of(m), g_all) < 1e-10);
}

TEST_CASE("padding: a batch whose every target is -1 is rejected", "[optim]") {
  const ModelConfig cfg = accum_config(RouterType::SoftmaxTopK, 4);
  CpuBackend<double> be;
  Model<double> m(cfg, be, 1);
  m.init_weights(1);
  const auto tok = random_tokens(4, cfg.vocab_size, 1);
  const std::vector<std::int32_t> tgt(4, -1);
  CHECK_THROWS_AS(m.forward_backward(tok.data(), tgt.data(), 1.0), std::invalid_argument);
}
