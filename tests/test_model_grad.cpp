// Whole-model gradient checks in double: the gradient of the full objective (CE + aux + z) with
// respect to every parameter tensor, against central finite differences, over the variants of
// the architecture (both routers, MHA and GQA, shared experts, dense layers, tied embeddings).
#include <catch2/catch.hpp>

#include <cstring>
#include <set>
#include <sstream>

#include "gradcheck.hpp"
#include "moetrain/cpu_backend.hpp"
#include "moetrain/model.hpp"
#include "test_util.hpp"

using namespace moetrain;
using namespace moetrain::test;

namespace {

struct Variant {
  RouterType router;
  int heads, kv_heads, shared, dense_layers;
  bool tied;
};

ModelConfig small_config(const Variant& v) {
  ModelConfig c = tiny_model({.vocab = 23,
                              .d_model = 12,
                              .heads = v.heads,
                              .kv_heads = v.kv_heads,
                              .seq = 6,
                              .dense_layers = v.dense_layers,
                              .expert_ff = 8,
                              .shared = v.shared});
  c.tie_embeddings = v.tied;
  c.init_std = 0.3;  // large enough that every nonlinearity is exercised
  c.moe.router = v.router;
  c.moe.route_scale = v.router == RouterType::SigmoidBias ? 2.5 : 1.0;
  c.moe.aux_loss_coef = 0.05;
  c.moe.z_loss_coef = 0.01;
  return c;
}

std::string describe(const Variant& v) {
  std::ostringstream s;
  s << (v.router == RouterType::SoftmaxTopK ? "softmax_topk" : "sigmoid_bias") << " heads "
    << v.heads << "/" << v.kv_heads << " shared " << v.shared << " dense " << v.dense_layers
    << (v.tied ? " tied" : "");
  return s.str();
}

}  // namespace

TEST_CASE("whole-model gradients match finite differences", "[grad][model]") {
  const Variant variants[] = {
      {RouterType::SoftmaxTopK, 4, 4, 0, 1, false},  // MHA, one dense layer
      {RouterType::SoftmaxTopK, 4, 2, 1, 0, false},  // GQA, shared expert, all MoE
      {RouterType::SigmoidBias, 4, 1, 0, 1, false},  // GQA (one kv head), sigmoid router
      {RouterType::SigmoidBias, 2, 2, 2, 2, true},   // MHA, two shared experts, tied embeddings
  };
  for (const Variant& v : variants) {
    INFO(describe(v));
    const ModelConfig cfg = small_config(v);
    CpuBackend<double> be;
    const int B = 2;
    Model<double> model(cfg, be, B);
    model.init_weights(42);
    // A non-zero expert bias so that selection differs from the plain scores.
    auto bias = random_vector(std::size_t(cfg.n_layers) * cfg.moe.n_experts, 5, 0.2);
    model.load_expert_bias_state(expert_bias_rows(bias, std::size_t(cfg.n_layers)), "test");

    Rng rng(7);
    std::vector<std::int32_t> tok(std::size_t(model.tokens())), tgt(tok.size());
    for (auto& t : tok) t = std::int32_t(rng.below(std::uint64_t(cfg.vocab_size)));
    for (auto& t : tgt) t = std::int32_t(rng.below(std::uint64_t(cfg.vocab_size)));

    model.zero_grads();
    const double obj = model.forward_backward(tok.data(), tgt.data(), 1.0).objective;
    const auto load0 = model.stats().load;
    std::vector<double> grads(model.grads(), model.grads() + model.layout().total());
    auto loss = [&] { return model.forward(tok.data(), tgt.data()).objective; };
    CHECK(loss() == obj);  // forward-only and forward+backward see the same objective

    std::uint64_t seed = 100;
    for (const ParamTensor& t : model.layout().tensors()) {
      std::vector<double> analytic(model.layout().total(), 0.0);
      std::vector<std::size_t> idx;
      for (std::size_t i : sample_indices(t.numel, 16, seed++)) idx.push_back(t.offset + i);
      const double err = fd_relative_error(loss, model.params(), grads, idx);
      INFO(t.name << " relative error " << err);
      CHECK(err < 1e-5);
    }
    loss();
    CHECK(model.stats().load == load0);  // no routing decision flipped during the check
  }
}

TEST_CASE("aux and z losses enter the objective with their coefficients", "[model]") {
  Variant v{RouterType::SoftmaxTopK, 4, 2, 0, 1, false};
  ModelConfig cfg = small_config(v);
  CpuBackend<double> be;
  Model<double> model(cfg, be, 2);
  model.init_weights(3);
  std::vector<std::int32_t> tok(std::size_t(model.tokens()), 1), tgt(tok.size(), 2);
  for (std::size_t i = 0; i < tok.size(); ++i) tok[i] = std::int32_t(i % 23);
  const ForwardStats s = model.forward(tok.data(), tgt.data());
  double expect = s.ce;
  for (int l = cfg.dense_layers; l < cfg.n_layers; ++l) {
    CHECK(s.aux[std::size_t(l)] > 0);
    CHECK(s.z[std::size_t(l)] > 0);
    int total = 0;
    for (int c : s.load[std::size_t(l)]) total += c;
    CHECK(total == model.tokens() * cfg.moe.top_k);
    expect +=
        cfg.moe.aux_loss_coef * s.aux[std::size_t(l)] + cfg.moe.z_loss_coef * s.z[std::size_t(l)];
  }
  CHECK(s.objective == Approx(expect).epsilon(1e-12));
  CHECK(s.load[0].empty());  // the dense layer has no router
}

TEST_CASE("the same seed gives bit-identical losses and gradients", "[model][determinism]") {
  ModelConfig cfg = small_config({RouterType::SigmoidBias, 4, 2, 1, 1, false});
  cfg.d_model = 32;
  cfg.seq_len = 16;
  cfg.init_std = 0.02;
  const bool bf16 = GENERATE(false, true);  // the float backend's GEMMs in fp32 and bf16
  INFO("bf16 GEMMs " << bf16);
  auto run = [&](std::uint64_t seed) {
    CpuBackend<float> be(CpuBackendOptions{bf16});
    Model<float> model(cfg, be, 4);
    model.init_weights(seed);
    Rng rng(seed);
    std::vector<std::int32_t> tok(std::size_t(model.tokens()) + 1);
    for (auto& t : tok) t = std::int32_t(rng.below(std::uint64_t(cfg.vocab_size)));
    model.zero_grads();
    const double obj = model.forward_backward(tok.data(), tok.data() + 1, 1.0).objective;
    std::vector<float> g(model.grads(), model.grads() + model.layout().total());
    return std::pair{obj, g};
  };
  const auto a = run(11), b = run(11), c = run(12);
  CHECK(std::memcmp(&a.first, &b.first, sizeof(double)) == 0);
  CHECK(std::memcmp(a.second.data(), b.second.data(), a.second.size() * sizeof(float)) == 0);
  CHECK(a.first != c.first);
}

// The head runs in chunks of the backend's head_chunk_rows tokens (lm_head, cross-entropy and the
// head's backward per chunk). A vocabulary of 27,000 makes the CPU's chunks 77 rows (2^21 logits):
// 160 tokens are three chunks, the last partial; the gradients of the head, the embedding (tied and
// not) and a layer must still be the objective's.
TEST_CASE("whole-model gradients match finite differences with the head in several chunks",
          "[grad][model]") {
  for (const bool tied : {false, true}) {
    INFO((tied ? "tied" : "untied") << " embeddings");
    ModelConfig cfg = tiny_model({.vocab = 27000,
                                  .d_model = 12,
                                  .layers = 2,
                                  .heads = 2,
                                  .kv_heads = 2,
                                  .seq = 40,
                                  .dense_layers = 1,
                                  .expert_ff = 8});
    cfg.tie_embeddings = tied;
    cfg.init_std = 0.3;
    CpuBackend<double> be;
    const int B = 4;
    Model<double> model(cfg, be, B);
    REQUIRE(be.head_chunk_rows(model.tokens(), cfg.vocab_size) == 77);
    REQUIRE(model.tokens() == 160);
    model.init_weights(43);
    Rng rng(8);
    std::vector<std::int32_t> tok(std::size_t(model.tokens())), tgt(tok.size());
    for (auto& t : tok) t = std::int32_t(rng.below(std::uint64_t(cfg.vocab_size)));
    for (auto& t : tgt) t = std::int32_t(rng.below(std::uint64_t(cfg.vocab_size)));
    tgt[5] = -1;  // a padding target inside a chunk
    model.zero_grads();
    const double obj = model.forward_backward(tok.data(), tgt.data(), 1.0).objective;
    std::vector<double> grads(model.grads(), model.grads() + model.layout().total());
    auto loss = [&] { return model.forward(tok.data(), tgt.data()).objective; };
    CHECK(loss() == obj);
    // The head's tensors, and of the layers the first and last matrices the head's gradient
    // reaches (every loss evaluation costs 160 x 27,000 logits, so the rest stay with the test
    // above).
    const std::set<std::string> checked{"embed.weight", "norm.weight", "lm_head.weight",
                                        "layers.0.attn.q_proj.weight", "layers.0.mlp.w2.weight"};
    std::uint64_t seed = 200;
    int n_checked = 0;
    for (const ParamTensor& t : model.layout().tensors()) {
      if (!checked.count(t.name)) continue;
      ++n_checked;
      std::vector<std::size_t> idx;
      if (t.name == "embed.weight")  // rows of tokens that occur: the others have no gradient
        for (int i = 0; i < 16; ++i)
          idx.push_back(t.offset + std::size_t(tok[std::size_t(i * 5)]) * std::size_t(cfg.d_model) +
                        std::size_t(i % cfg.d_model));
      else
        for (std::size_t i : sample_indices(t.numel, 10, seed++)) idx.push_back(t.offset + i);
      const double err = fd_relative_error(loss, model.params(), grads, idx);
      INFO(t.name << " relative error " << err);
      CHECK(err < 1e-5);
    }
    CHECK(n_checked == (tied ? 4 : 5));  // every named tensor exists under this layout
  }
}
