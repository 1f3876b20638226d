// CudaBackend::run_repeated as CUDA graphs: a micro-batch's forward+backward captured once and
// replayed gives the same bits as running every op eagerly, and a repeated region that would make
// the host wait (or transfer, or allocate) fails loudly instead of being captured wrongly. In the
// simulator build the simulator's stream capture records and replays the work; on a GPU these are
// real graphs.
#include <catch2/catch.hpp>

#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.hpp"
#include "kernel_test_util.hpp"
#include "moetrain/device_stats.hpp"
#include "moetrain/model.hpp"
#include "moetrain/optimizer.hpp"
#include "test_util.hpp"

namespace {

using moetrain::CudaBackend;
using moetrain::CudaBackendOptions;

struct Run {
  std::vector<double> losses;
  std::vector<float> params;
  CudaBackend::GraphStats graphs;
};

// `steps` optimizer steps of `ga` micro-batches each, as the trainer takes them (stats slots, one
// download per step, router-bias update), with or without graphs.
Run train(bool graphs, int steps, int ga) {
  moetrain::Config cfg = moetrain::test::tiny_config({.vocab = 37,
                                                      .d_model = 32,
                                                      .layers = 2,
                                                      .head_dim = 16,
                                                      .seq = 8,
                                                      .dense_ff = 24,
                                                      .expert_ff = 16,
                                                      .shared_ff = 8});
  cfg.model.moe.router = moetrain::RouterType::SigmoidBias;
  cfg.model.moe.route_scale = 2.0;
  cfg.optim.name = moetrain::OptimizerName::MuonClip;
  cfg.optim.lr = 0.02;
  cfg.optim.qk_clip_tau = 0.5;
  cfg.train.grad_accum = ga;
  constexpr int kBatch = 2;
  CudaBackendOptions o;
  o.graphs = graphs;
  CudaBackend be(o);
  moetrain::DeviceStats<float> stats(be);
  moetrain::Model<float> model(cfg.model, be, kBatch, &stats, ga);
  model.init_weights(3);
  moetrain::Optimizer<float> opt(cfg, model.layout(), be, nullptr, &stats);
  stats.allocate();
  std::mt19937 rng(11);
  const std::size_t n = std::size_t(kBatch) * cfg.model.seq_len;
  Run r;
  for (int s = 0; s < steps; ++s) {
    model.zero_grads();
    for (int micro = 0; micro < ga; ++micro) {
      std::vector<std::int32_t> tok(n), tgt(n);
      for (auto* v : {&tok, &tgt})
        for (auto& x : *v) x = std::int32_t(rng() % std::uint32_t(cfg.model.vocab_size));
      tgt[std::size_t(s + micro) % n] = -1;  // padding: the valid count (the CE scale) varies
      model.forward_backward_async(tok.data(), tgt.data(), 1.0 / ga, micro);
    }
    opt.step_async(
        model.params(), model.grads(), cfg.optim.lr,
        moetrain::StepInputs<float>{model.smax_device(), ga, model.loss_sums_device(), ga});
    stats.download();
    REQUIRE_FALSE(opt.finish_step().skipped);
    std::vector<std::vector<std::int64_t>> load(std::size_t(cfg.model.n_layers));
    for (int micro = 0; micro < ga; ++micro) {
      const moetrain::ForwardStats st = model.slot_stats(micro);
      r.losses.push_back(st.objective);
      for (std::size_t l = 0; l < load.size(); ++l) {
        load[l].resize(st.load[l].size(), 0);
        for (std::size_t e = 0; e < st.load[l].size(); ++e) load[l][e] += st.load[l][e];
      }
    }
    model.update_router_biases(load, cfg.model.moe.bias_update_rate);
  }
  r.params.resize(model.layout().total());
  be.download(r.params.data(), model.params(), r.params.size() * sizeof(float));
  r.graphs = be.graph_stats();
  return r;
}

}  // namespace

TEST_CASE("cuda graphs: replayed micro-batches equal eager execution bit for bit",
          "[cuda_backend][graphs]") {
  EACH_STREAM_SCHEDULE();
  for (const int ga : {1, 2}) {
    INFO("grad_accum " << ga);
    constexpr int kSteps = 5;
    const Run eager = train(false, kSteps, ga);
    const Run graphs = train(true, kSteps, ga);
    CHECK(eager.graphs.captures == 0);
    CHECK(eager.graphs.replays == 0);
    // Each micro-batch slot runs eagerly on step 1; that step's optimizer grows scratch buffers,
    // which drops the recordings (a graph must not hold a freed buffer), so step 2 warms up again,
    // step 3 captures and later steps replay: once the buffers have their size, nothing is
    // captured again.
    CHECK(graphs.graphs.captures == std::uint64_t(ga));
    CHECK(graphs.graphs.replays == std::uint64_t(ga * (kSteps - 3)));
    REQUIRE(graphs.losses.size() == eager.losses.size());
    for (std::size_t i = 0; i < eager.losses.size(); ++i) {
      INFO("micro-batch " << i);
      CHECK(graphs.losses[i] == eager.losses[i]);
    }
    REQUIRE(graphs.params.size() == eager.params.size());
    CHECK(std::memcmp(graphs.params.data(), eager.params.data(), eager.params.size() * 4) == 0);
    CHECK_FALSE(kernel_test::has_nan(graphs.params));
  }
}

TEST_CASE(
    "cuda graphs: a repeated region that would synchronise, transfer or allocate fails "
    "loudly, and the stream stays usable",
    "[cuda_backend][graphs]") {
  EACH_STREAM_SCHEDULE();
  CudaBackendOptions o;
  CudaBackend be(o);
  auto* x = static_cast<float*>(be.alloc_bytes(4 * sizeof(float)));
  auto* y = static_cast<float*>(be.alloc_bytes(4 * sizeof(float)));
  const std::vector<float> ones(4, 1.0f);
  float host[4] = {0, 0, 0, 0};
  std::vector<void*> allocs;
  struct Bad {
    const char* what;
    std::function<void()> call;
  };
  const std::vector<Bad> bad = {
      {"download", [&] { be.download(host, x, sizeof host); }},
      {"synchronize", [&] { be.synchronize(); }},
      {"upload", [&] { be.upload(y, ones.data(), sizeof(float)); }},
      // Kept until the end: a free drops every recording, so the next call would warm up again.
      {"alloc_bytes", [&] { allocs.push_back(be.alloc_bytes(16)); }},
  };
  for (std::size_t i = 0; i < bad.size(); ++i) {
    INFO(bad[i].what);
    be.upload(x, ones.data(), sizeof(float) * 4);
    const CudaBackend::RepeatKey key{&be, i};
    const auto work = [&] {
      be.add_inplace(x, x, 4);  // device work, then the call a graph cannot hold
      bad[i].call();
    };
    be.run_repeated(key, work);  // the warm-up runs eagerly: legal
    try {
      be.run_repeated(key, work);  // the capture
      FAIL("the capture went through");
    } catch (const std::logic_error& e) {
      const std::string msg = e.what();
      CHECK(msg.find(bad[i].what) != std::string::npos);
      CHECK(msg.find("CUDA graph capture") != std::string::npos);
    }
    // Nothing was captured or replayed, and the stream works: the abandoned capture did not run
    // its add (x doubled by the warm-up only).
    CHECK(be.graph_stats().captures == 0);
    be.download(host, x, sizeof host);
    CHECK(host[0] == 2.0f);
    CHECK(host[3] == 2.0f);
  }
  for (void* p : allocs) be.free_bytes(p);
  be.free_bytes(y);
  be.free_bytes(x);
}
