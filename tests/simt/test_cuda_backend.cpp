// The CUDA backend as a whole, in the simulator: training steps (forward, backward, optimizer
// update with AdamW, MuonClip, NorMuon with QK-clip, AdaMuon and SOAP, expert-bias update) of a
// small MoE on CudaBackend against the same steps on CpuBackend<float>, within the bf16 tolerance
// in both modes: bf16 mode stores activations in bf16 and multiplies bf16 operands (fp32
// accumulation, bf16 weight copy), and the flash attention of both modes reads bf16 (the fp32 GEMMs
// themselves are checked to fp32 rounding on their own). Plus the bf16 weight copy itself:
// stochastic rounding brackets, determinism, refresh after every write. Every test runs under both
// stream schedules (eager and deferred), so a missing synchronisation of the backend's stream
// shows.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.hpp"
#include "kernel_test_util.hpp"
#include "moetrain/cpu_backend.hpp"
#include "moetrain/device_stats.hpp"
#include "moetrain/model.hpp"
#include "moetrain/optimizer.hpp"
#include "test_util.hpp"

namespace {

using moetrain::Backend;
using moetrain::Config;
using moetrain::CpuBackend;
using moetrain::CudaBackend;
using moetrain::CudaBackendOptions;
using moetrain::OptimizerName;
using moetrain::RouterType;
using moetrain::to_string;
using moetrain::test::tiny_config;

Config small_config(RouterType router, OptimizerName optimizer) {
  Config c = tiny_config({.vocab = 37,
                          .d_model = 32,
                          .layers = 2,
                          .head_dim = 16,  // the smallest the flash kernels take
                          .seq = 8,
                          .dense_ff = 24,
                          .expert_ff = 16,
                          .shared_ff = 8});
  auto& m = c.model;
  m.init_std = 0.2;
  m.moe.router = router;
  m.moe.route_scale = router == RouterType::SigmoidBias ? 2.0 : 1.0;
  m.moe.aux_loss_coef = 0.01;
  m.moe.z_loss_coef = 0.001;
  c.optim.name = optimizer;
  c.optim.lr = 0.02;
  c.optim.qk_clip_tau = 0.5;  // low enough that heads are clipped
  return c;
}

struct Trace {
  std::vector<double> losses;
  std::vector<float> first_grads, params;
  int clipped = 0;
};

// `steps` training steps as the trainer takes them, on one backend.
Trace train(Backend<float>& be, const Config& cfg, int steps) {
  constexpr int kBatch = 2;
  moetrain::Model<float> model(cfg.model, be, kBatch);
  model.init_weights(5);
  moetrain::Optimizer<float> opt(cfg, model.layout(), be);
  std::mt19937 rng(9);
  const std::size_t n = std::size_t(kBatch) * cfg.model.seq_len;
  const std::size_t P = model.layout().total();
  Trace t;
  for (int s = 0; s < steps; ++s) {
    std::vector<std::int32_t> tok(n), tgt(n);
    for (auto* v : {&tok, &tgt})
      for (auto& x : *v) x = std::int32_t(rng() % std::uint32_t(cfg.model.vocab_size));
    tgt[3] = -1;  // padding
    model.zero_grads();
    const moetrain::ForwardStats& st = model.forward_backward(tok.data(), tgt.data(), 1.0);
    t.losses.push_back(st.objective);
    if (s == 0) {
      t.first_grads.resize(P);
      be.download(t.first_grads.data(), model.grads(), P * sizeof(float));
    }
    std::vector<std::vector<std::int64_t>> load;
    for (const auto& l : st.load) load.emplace_back(l.begin(), l.end());
    const auto smax = st.smax;
    t.clipped += opt.step(model.params(), model.grads(), cfg.optim.lr, smax).clipped_heads;
    if (cfg.model.moe.router == RouterType::SigmoidBias)
      model.update_router_biases(load, cfg.model.moe.bias_update_rate);
  }
  t.params.resize(P);
  be.download(t.params.data(), model.params(), P * sizeof(float));
  return t;
}

void compare(const Trace& gpu, const Trace& cpu, double tol) {
  REQUIRE(gpu.losses.size() == cpu.losses.size());
  for (std::size_t i = 0; i < cpu.losses.size(); ++i) {
    INFO("step " << i << ": cuda " << gpu.losses[i] << ", cpu " << cpu.losses[i]);
    CHECK(std::isfinite(gpu.losses[i]));
    CHECK(std::abs(gpu.losses[i] - cpu.losses[i]) <= tol * std::abs(cpu.losses[i]));
  }
  CHECK_FALSE(kernel_test::has_nan(gpu.first_grads));
  const double g = kernel_test::rel_error(gpu.first_grads, cpu.first_grads);
  const double p = kernel_test::rel_error(gpu.params, cpu.params);
  INFO("gradients " << g << ", parameters " << p);
  UNSCOPED_INFO("relative error: gradients " << g << ", parameters " << p);
  CHECK(g <= tol);
  CHECK(p <= tol);
}

}  // namespace

TEST_CASE("cuda backend: training steps in fp32 mode match the CPU backend (attention in bf16)",
          "[cuda_backend]") {
  EACH_STREAM_SCHEDULE();
  for (const RouterType router : {RouterType::SoftmaxTopK, RouterType::SigmoidBias}) {
    for (const OptimizerName optimizer : {OptimizerName::AdamW, OptimizerName::MuonClip}) {
      INFO((router == RouterType::SoftmaxTopK ? "softmax_topk " : "sigmoid_bias ")
           << to_string(optimizer));
      const Config cfg = small_config(router, optimizer);
      CpuBackend<float> cpu;
      CudaBackendOptions o;
      o.bf16 = false;
      CudaBackend gpu(o);
      CHECK(gpu.activation_storage() == moetrain::Storage::F32);
      const Trace ref = train(cpu, cfg, 3);
      const Trace got = train(gpu, cfg, 3);
      compare(got, ref, 2e-2);
      CHECK(got.clipped == ref.clipped);
      if (optimizer == OptimizerName::MuonClip) CHECK(ref.clipped > 0);
    }
  }
}

// SOAP is compared on its own (test_matrix_optimizer_ops.cpp): with 16 tokens a step, its factors
// are rank-deficient and their null-space eigenvectors are rounding noise (docs/design.md §4.6).
TEST_CASE("cuda backend: NorMuon and AdaMuon training steps match the CPU backend",
          "[cuda_backend][matrix_optimizers]") {
  EACH_STREAM_SCHEDULE();
  for (const OptimizerName optimizer : {OptimizerName::NorMuon, OptimizerName::AdaMuon}) {
    INFO(to_string(optimizer));
    Config cfg = small_config(RouterType::SoftmaxTopK, optimizer);
    cfg.optim.qk_clip = optimizer == OptimizerName::NorMuon;  // QK-clip after another optimizer
    CpuBackend<float> cpu;
    CudaBackendOptions o;
    o.bf16 = false;
    CudaBackend gpu(o);
    const Trace ref = train(cpu, cfg, 3);
    const Trace got = train(gpu, cfg, 3);
    // AdaMuon orthogonalises sign(momentum): an element within rounding of zero flips between the
    // backends, a full-size change of that input (measured 0.021 on the parameters).
    compare(got, ref, optimizer == OptimizerName::AdaMuon ? 4e-2 : 2e-2);
    CHECK(got.clipped == ref.clipped);
    if (cfg.optim.qk_clip) CHECK(ref.clipped > 0);
  }
}

namespace {

// One optimizer step on `be` from parameters p and gradients g, with one loss sum `loss` gating it
// (the trainer's path: a shared stats block, step_async, one download, finish_step). Returns the
// step's statistics; `params` receives the parameters after it.
moetrain::OptimizerStats gated_step(Backend<float>& be, moetrain::Optimizer<float>& opt,
                                    moetrain::DeviceStats<float>& stats,
                                    moetrain::DeviceStats<float>::Region<double> loss_region,
                                    moetrain::DeviceStats<float>::Region<float> smax_region,
                                    float* dp, const float* dg, double loss) {
  be.upload(stats.device(loss_region), &loss, sizeof loss);
  std::vector<float> smax(smax_region.count, 2.0f);  // over tau = 0.5: QK-clip would scale
  be.upload(stats.device(smax_region), smax.data(), smax.size() * sizeof(float));
  opt.step_async(
      dp, dg, 0.05,
      moetrain::StepInputs<float>{stats.device(smax_region), 1, stats.device(loss_region), 1});
  stats.download();
  return opt.finish_step();
}

}  // namespace

TEST_CASE("cuda backend: a non-finite gradient or loss skips the whole step on the device",
          "[cuda_backend]") {
  EACH_STREAM_SCHEDULE();
  Config cfg = small_config(RouterType::SigmoidBias, OptimizerName::MuonClip);
  cfg.optim.grad_clip = 1.0;
  const moetrain::ParamLayout layout(cfg.model);
  const std::size_t P = layout.total();
  std::mt19937 rng(77);
  const std::vector<float> p = kernel_test::random_floats(P, rng, 0.3f),
                           g = kernel_test::random_floats(P, rng, 0.1f);
  const double nan = std::nan("");
  for (const bool bad_gradient : {true, false}) {
    INFO((bad_gradient ? "a NaN gradient" : "a NaN loss with finite gradients"));
    CudaBackendOptions o;
    o.bf16 = false;
    CudaBackend be(o);
    moetrain::DeviceStats<float> stats(be);
    moetrain::Optimizer<float> opt(cfg, layout, be, nullptr, &stats);
    const auto loss_region = stats.reserve<double>(1);
    const auto smax_region =
        stats.reserve<float>(std::size_t(cfg.model.n_layers) * std::size_t(cfg.model.n_heads));
    stats.allocate();
    std::vector<float> bad = g;
    if (bad_gradient) bad[layout.find("layers.0.attn.q_proj.weight").offset + 3] = float(nan);
    kernel_test::DeviceBuffer<float> dp(p), dg(bad);
    const moetrain::OptimizerStats st = gated_step(be, opt, stats, loss_region, smax_region, dp.ptr,
                                                   dg.ptr, bad_gradient ? 1.0 : nan);
    CHECK(st.skipped);
    CHECK(std::isfinite(st.grad_norm) != bad_gradient);
    CHECK(opt.step_count() == 0);
    CHECK(std::memcmp(dp.download().data(), p.data(), P * sizeof(float)) == 0);
    // The state is as before: the next finite step is a fresh optimizer's first step, bit for bit.
    dg.upload(g);
    CHECK_FALSE(gated_step(be, opt, stats, loss_region, smax_region, dp.ptr, dg.ptr, 1.0).skipped);
    CudaBackend fresh_be(o);
    moetrain::DeviceStats<float> fresh_stats(fresh_be);
    moetrain::Optimizer<float> fresh(cfg, layout, fresh_be, nullptr, &fresh_stats);
    const auto fl = fresh_stats.reserve<double>(1);
    const auto fs = fresh_stats.reserve<float>(smax_region.count);
    fresh_stats.allocate();
    kernel_test::DeviceBuffer<float> fp(p), fg(g);
    const moetrain::OptimizerStats fst =
        gated_step(fresh_be, fresh, fresh_stats, fl, fs, fp.ptr, fg.ptr, 1.0);
    CHECK(fst.clipped_heads > 0);  // the step did clip: QK-clip ran under the gate too
    CHECK(std::memcmp(dp.download().data(), fp.download().data(), P * sizeof(float)) == 0);
  }
  // The CPU backend skips the same way (the convenience step throws).
  CpuBackend<float> cpu;
  moetrain::Optimizer<float> opt(cfg, layout, cpu);
  std::vector<float> w = p, bad = g;
  bad[7] = float(nan);
  const std::vector<std::vector<double>> smax(
      std::size_t(cfg.model.n_layers), std::vector<double>(std::size_t(cfg.model.n_heads), 2.0));
  CHECK_THROWS_AS(opt.step(w.data(), bad.data(), 0.05, smax), moetrain::NonFiniteError);
  CHECK(w == p);
  CHECK(opt.step_count() == 0);
}

TEST_CASE("cuda backend: bf16 activations and GEMMs stay within bf16 tolerance of the CPU backend",
          "[cuda_backend]") {
  EACH_STREAM_SCHEDULE();
  const Config cfg = small_config(RouterType::SoftmaxTopK, OptimizerName::MuonClip);
  CpuBackend<float> cpu;
  CudaBackendOptions o;
  o.bf16 = true;
  o.seed = 3;
  CudaBackend gpu(o);
  CHECK(gpu.activation_storage() == moetrain::Storage::BF16);  // the model's arena is bf16
  const Trace ref = train(cpu, cfg, 3);
  const Trace got = train(gpu, cfg, 3);
  compare(got, ref, 2e-2);
  // ...and the bf16 rounding is really there: not the fp32 numbers.
  CHECK(kernel_test::rel_error(got.first_grads, ref.first_grads) > 1e-6);

  // Same seed, same run: bit-identical.
  CudaBackend again(o);
  const Trace twice = train(again, cfg, 3);
  CHECK(twice.losses == got.losses);
  CHECK(std::memcmp(twice.params.data(), got.params.data(), got.params.size() * 4) == 0);
}

TEST_CASE("cuda backend: stochastic rounding of the bf16 weight copy brackets and follows writes",
          "[cuda_backend]") {
  EACH_STREAM_SCHEDULE();
  const std::size_t n = 4096;
  std::mt19937 rng(4);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> w(n);
  for (auto& x : w) x = normal(rng);

  auto copy_of = [&](CudaBackend& be) {
    std::vector<__nv_bfloat16> out(n);
    be.download(out.data(), be.weight_copy(), n * sizeof(__nv_bfloat16));
    return out;
  };
  // Each copy element is one of the two bf16 values around the master (truncation, or one ulp
  // up), so the copy is the master within one bf16 ulp, both directions occurring.
  auto check_brackets = [&](const std::vector<__nv_bfloat16>& c, const std::vector<float>& m) {
    int up = 0, down = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const std::uint32_t bits = moetrain::kernels::float_bits(m[i]);
      const std::uint16_t lo = std::uint16_t(bits >> 16), got = moetrain::kernels::bf16_bits(c[i]);
      if ((bits & 0xffffu) == 0) {
        CHECK(got == lo);
        continue;
      }
      CHECK((got == lo || got == std::uint16_t(lo + 1)));
      (got == lo ? down : up)++;
    }
    CHECK(up > int(n) / 8);
    CHECK(down > int(n) / 8);
  };

  CudaBackendOptions o;
  o.bf16 = true;
  o.stochastic_weight_rounding = true;
  o.seed = 11;
  CudaBackend be(o);
  auto* dev = static_cast<float*>(be.alloc_bytes(n * sizeof(float)));
  be.set_weights(dev, n);
  be.upload(dev, w.data(), n * sizeof(float));
  const auto first = copy_of(be);
  check_brackets(first, w);

  // Unchanged masters: the same copy (no needless rewrite).
  CHECK(std::memcmp(copy_of(be).data(), first.data(), n * 2) == 0);

  // A write through any op (here the optimizer's scale, as QK-clip does) makes it follow.
  be.scale(dev + 100, 200, 0.5);
  for (std::size_t i = 100; i < 300; ++i) w[i] *= 0.5f;
  const auto second = copy_of(be);
  check_brackets(second, w);

  // Another seed rounds differently; the same seed identically.
  CudaBackendOptions o2 = o;
  o2.seed = 12;
  CudaBackend other(o2), same(o);
  std::vector<float*> device_of;
  for (CudaBackend* b : {&other, &same}) {
    auto* d = static_cast<float*>(b->alloc_bytes(n * sizeof(float)));
    device_of.push_back(d);
    b->set_weights(d, n);
    b->upload(d, w.data(), n * sizeof(float));
    b->weight_copy();
    b->scale(d, 1, 1.0);  // the second rewrite, as for `second`
  }
  std::vector<__nv_bfloat16> a(n), s(n);
  other.download(a.data(), other.weight_copy(), n * 2);
  same.download(s.data(), same.weight_copy(), n * 2);
  CHECK(std::memcmp(a.data(), second.data(), n * 2) != 0);
  CHECK(std::memcmp(s.data(), second.data(), n * 2) == 0);
  be.free_bytes(dev);
  other.free_bytes(device_of[0]);
  same.free_bytes(device_of[1]);
}

TEST_CASE("cuda backend: by default the bf16 weight copy is rounded to nearest even",
          "[cuda_backend]") {
  EACH_STREAM_SCHEDULE();
  const std::size_t n = 2 * 4096 + 37;  // whole rows of the conversion and a tail
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> w(n);
  for (auto& x : w) x = normal(rng);
  // Round to nearest, ties to even, on the bits (finite values).
  auto nearest = [](float x) {
    const std::uint32_t bits = moetrain::kernels::float_bits(x);
    return std::uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  };
  for (const std::uint64_t seed : {11u, 12u}) {
    CudaBackendOptions o;
    o.bf16 = true;
    o.seed = seed;  // no effect: nothing is random
    CudaBackend be(o);
    auto* dev = static_cast<float*>(be.alloc_bytes(n * sizeof(float)));
    be.set_weights(dev, n);
    be.upload(dev, w.data(), n * sizeof(float));
    std::vector<__nv_bfloat16> copy(n);
    be.download(copy.data(), be.weight_copy(), n * sizeof(__nv_bfloat16));
    for (std::size_t i = 0; i < n; ++i)
      CHECK(moetrain::kernels::bf16_bits(copy[i]) == nearest(w[i]));
    // A write makes the copy follow.
    be.scale(dev + n - 10, 10, -3.0);
    be.download(copy.data(), be.weight_copy(), n * sizeof(__nv_bfloat16));
    for (std::size_t i = n - 10; i < n; ++i)
      CHECK(moetrain::kernels::bf16_bits(copy[i]) == nearest(w[i] * -3.0f));
    be.free_bytes(dev);
  }
}

TEST_CASE("cuda backend: GEMM layouts (transposes, leading dimensions, batches, beta)",
          "[cuda_backend]") {
  EACH_STREAM_SCHEDULE();
  std::mt19937 rng(2);
  CpuBackend<float> cpu;
  const int M = 5, N = 7, K = 3, batch = 3, pad = 2;
  for (const bool bf16 : {false, true})
    for (const bool ta : {false, true})
      for (const bool tb : {false, true}) {
        INFO("bf16 " << bf16 << " ta " << ta << " tb " << tb);
        CudaBackendOptions o;
        o.bf16 = bf16;
        CudaBackend gpu(o);
        const int lda = (ta ? M : K) + pad, ldb = (tb ? K : N) + pad, ldc = N + pad;
        const std::size_t sa = std::size_t(ta ? K : M) * lda + 1,
                          sb = std::size_t(tb ? N : K) * ldb;
        const std::size_t sc = std::size_t(M) * ldc + 3;
        const auto A = kernel_test::random_floats(sa * batch, rng);
        const auto B = kernel_test::random_floats(sb * batch, rng);
        const auto C0 = kernel_test::random_floats(sc * batch, rng);
        std::vector<float> ref = C0;
        cpu.gemm_batched(ta, tb, M, N, K, 0.7f, A.data(), lda, sa, B.data(), ldb, sb, 0.3f,
                         ref.data(), ldc, sc, batch);
        kernel_test::DeviceBuffer<float> dA(A), dB(B), dC(C0);
        gpu.gemm_batched(ta, tb, M, N, K, 0.7f, dA.ptr, lda, sa, dB.ptr, ldb, sb, 0.3f, dC.ptr, ldc,
                         sc, batch);
        gpu.synchronize();
        const double err = kernel_test::rel_error(dC.download(), ref);
        CHECK(err <= (bf16 ? 1e-2 : 1e-6));
        if (bf16) CHECK(err > 1e-6);  // the operands really were rounded
      }
}

TEST_CASE("cuda backend: an empty sum (K = 0) scales C by beta, padding and gaps untouched",
          "[cuda_backend]") {
  EACH_STREAM_SCHEDULE();
  std::mt19937 rng(3);
  const int M = 4, N = 5, ldc = N + 2, batch = 3;
  // Matrices back to back (one launch over all rows) and with gaps between them (one per matrix).
  for (const std::size_t sc : {std::size_t(M) * ldc, std::size_t(M) * ldc + 3})
    for (const float beta : {0.0f, 0.5f, 1.0f}) {
      INFO("stride " << sc << " beta " << beta);
      const auto C0 = kernel_test::random_floats(sc * batch, rng);
      std::vector<float> want = C0;
      for (int b = 0; b < batch; ++b)
        for (int r = 0; r < M; ++r)
          for (int c = 0; c < N; ++c) {
            float& v = want[std::size_t(b) * sc + std::size_t(r) * ldc + std::size_t(c)];
            v = beta == 0.0f ? 0.0f : beta * v;
          }
      CudaBackend gpu(CudaBackendOptions{});
      kernel_test::DeviceBuffer<float> dA(std::size_t(1)), dB(std::size_t(1)), dC(C0);
      gpu.gemm_batched(false, false, M, N, 0, 0.7f, dA.ptr, 1, 0, dB.ptr, ldc, 0, beta, dC.ptr, ldc,
                       sc, batch);
      gpu.synchronize();
      CHECK(dC.download() == want);
    }
}

TEST_CASE("cuda backend: available memory is cudaMemGetInfo's free bytes", "[cuda_backend]") {
  EACH_STREAM_SCHEDULE();
  CudaBackendOptions o;
  o.bf16 = false;
  const CudaBackend be(o);
  std::size_t free_bytes = 0, total_bytes = 0;
  REQUIRE(cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess);
  const std::size_t avail = be.available_memory_bytes();
  CHECK(avail > 0);
  CHECK(avail <= total_bytes);
}

// bf16 storage through the GEMM: bf16 operands and a bf16 C with padding between its rows (which
// the product must leave alone), an fp32 C from bf16 activations (a weight gradient), and the
// router's case — an fp32 C that reads the weights — which runs in fp32 on the master weights.
TEST_CASE("cuda backend: GEMMs on bf16 activations, and the fp32 product from the weights",
          "[cuda_backend]") {
  EACH_STREAM_SCHEDULE();
  using moetrain::CDevPtr;
  using moetrain::DevPtr;
  using moetrain::Storage;
  using bf16 = __nv_bfloat16;
  std::mt19937 rng(12);
  CpuBackend<float> cpu;
  const int M = 9, N = 6, K = 11, ldc = N + 3;
  CudaBackendOptions o;
  o.bf16 = true;
  CudaBackend gpu(o);
  const auto A =
      kernel_test::representable<bf16>(kernel_test::random_floats(std::size_t(M) * K, rng));
  const auto W = kernel_test::random_floats(std::size_t(N) * K, rng);  // [N, K] fp32 "weights"
  const auto C0 =
      kernel_test::representable<bf16>(kernel_test::random_floats(std::size_t(M) * ldc, rng));
  kernel_test::DeviceBuffer<bf16> dA(kernel_test::to_storage<bf16>(A)),
      dC(kernel_test::to_storage<bf16>(C0));
  kernel_test::DeviceBuffer<float> dW(W), dF(std::size_t(M) * N);
  gpu.set_weights(dW.ptr, W.size());
  const CDevPtr a(dA.ptr, Storage::BF16);
  // bf16 C = A W^T (beta 0): within bf16 rounding of the fp32 product; the padding untouched.
  std::vector<float> ref = C0;
  cpu.gemm(false, true, M, N, K, 1.0f, A.data(), K, W.data(), K, 0.0f, ref.data(), ldc);
  gpu.gemm(false, true, M, N, K, 1.0f, a, K, dW.ptr, K, 0.0f, DevPtr(dC.ptr, Storage::BF16), ldc);
  gpu.synchronize();  // the test's buffers are read on the legacy stream
  const auto C = kernel_test::to_float(dC.download());
  std::vector<float> got_rows, ref_rows;
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < ldc; ++c) {
      const std::size_t i = std::size_t(r) * ldc + std::size_t(c);
      if (c < N) {
        got_rows.push_back(C[i]);
        ref_rows.push_back(ref[i]);
      } else {
        CHECK(C[i] == C0[i]);  // between the rows: as it was, bit for bit
      }
    }
  const double err_c = kernel_test::rel_error(got_rows, ref_rows);
  CHECK(err_c <= 1e-2);
  CHECK(err_c > 1e-6);  // the weights really were read through the bf16 copy
  // fp32 C from the weights (the router's logits): the fp32 product of the masters.
  gpu.gemm(false, true, M, N, K, 1.0f, a, K, dW.ptr, K, 0.0f, dF.ptr, N);
  std::vector<float> ref_f(std::size_t(M) * N);
  cpu.gemm(false, true, M, N, K, 1.0f, A.data(), K, W.data(), K, 0.0f, ref_f.data(), N);
  gpu.synchronize();
  CHECK(kernel_test::rel_error(dF.download(), ref_f) <= 1e-6);
  // A storage mix in one elementwise op is refused, naming the op.
  kernel_test::DeviceBuffer<float> dx(std::size_t(M) * K);
  CHECK_THROWS_WITH(
      gpu.add_inplace(DevPtr(dA.ptr, Storage::BF16), CDevPtr(dx.ptr), A.size()),
      Catch::Contains("add_inplace") && Catch::Contains("bf16") && Catch::Contains("f32"));
}
