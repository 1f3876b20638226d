// Newton-Schulz on the CUDA backend against the CPU's NS5: one Muon step with lr 1, no momentum
// and no decay, so W_old - W_new = s * O for every Muon matrix, on CudaBackend (Gram products on
// kernels/symmetric_gemm.cu with bf16 operands, P X through the GEMM) and on CpuBackend<float>
// (BLAS syrk). Wide, square and tall matrices (a tall one's Gram matrix is X^T X, no transpose)
// and a batch of same-shape experts. The orthogonalised update agrees within the bf16 tolerance,
// and its singular values lie in the same band as the CPU's.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "backend/cuda/cuda_backend.hpp"
#include "kernel_test_util.hpp"
#include "moetrain/cpu_backend.hpp"
#include "moetrain/optimizer.hpp"
#include "moetrain/param_layout.hpp"
#include "test_util.hpp"

namespace {

using moetrain::ParamLayout;
using moetrain::ParamTensor;

// Singular values of the row-major [A, B] matrix O: square roots of its Gram matrix's eigenvalues
// (over the smaller side).
std::vector<double> singular_values(const std::vector<double>& O, int A, int B) {
  const int m = std::min(A, B);
  std::vector<double> gram(std::size_t(m) * m, 0.0);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < m; ++j) {
      double s = 0;
      for (int p = 0; p < std::max(A, B); ++p)
        s += A <= B ? O[std::size_t(i) * B + p] * O[std::size_t(j) * B + p]
                    : O[std::size_t(p) * B + i] * O[std::size_t(p) * B + j];
      gram[std::size_t(i) * m + j] = s;
    }
  std::vector<double> sv = moetrain::test::sym_eigenvalues(gram, m);
  for (double& v : sv) v = std::sqrt(std::max(v, 0.0));
  return sv;
}

// W_old - W_new after one step, per Muon matrix, divided by its scale: O.
std::vector<std::vector<double>> muon_directions(moetrain::Backend<float>& be,
                                                 const moetrain::Config& cfg,
                                                 const std::vector<float>& p,
                                                 const std::vector<float>& g) {
  const ParamLayout layout(cfg.model);
  moetrain::Optimizer<float> opt(cfg, layout, be);
  const std::size_t n = layout.total(), bytes = n * sizeof(float);
  auto* dp = static_cast<float*>(be.alloc_bytes(bytes));
  auto* dg = static_cast<float*>(be.alloc_bytes(bytes));
  be.upload(dp, p.data(), bytes);
  be.upload(dg, g.data(), bytes);
  opt.step(dp, dg, 1.0, {});
  std::vector<float> after(n);
  be.download(after.data(), dp, bytes);
  be.free_bytes(dg);
  be.free_bytes(dp);
  std::vector<std::vector<double>> out;
  for (const ParamTensor& t : layout.tensors()) {
    if (!moetrain::is_hidden_matrix(t.role)) continue;
    const int A = int(t.shape[0]), B = int(t.shape[1]);
    const double s = 0.2 * std::sqrt(double(std::max(A, B)));  // match_rms_adamw (the default)
    std::vector<double> O(t.numel);
    for (std::size_t i = 0; i < t.numel; ++i)
      O[i] = (double(p[t.offset + i]) - double(after[t.offset + i])) / s;
    out.push_back(std::move(O));
  }
  return out;
}

}  // namespace

TEST_CASE("Newton-Schulz on the CUDA backend agrees with the CPU's NS5 within bf16 tolerance",
          "[cuda_backend][ns]") {
  EACH_STREAM_SCHEDULE();
  // q [16, 16] square, k/v [8, 16] wide, w1/w3 [24, 16] tall (dense) and [12, 16] tall (4 experts
  // and a shared one: a batch of 5), w2 wide.
  moetrain::Config cfg = moetrain::test::tiny_config({.vocab = 19,
                                                      .d_model = 16,
                                                      .layers = 2,
                                                      .heads = 4,
                                                      .kv_heads = 2,
                                                      .head_dim = 4,
                                                      .dense_ff = 24,
                                                      .expert_ff = 12,
                                                      .shared_ff = 12});
  cfg.optim.name = moetrain::OptimizerName::Muon;
  cfg.optim.momentum = 0;
  cfg.optim.nesterov = false;
  cfg.optim.grad_clip = 0;
  cfg.optim.muon_group.lr_scale = 1;
  cfg.optim.muon_group.weight_decay = 0;
  const ParamLayout layout(cfg.model);
  std::mt19937 rng(5);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> p(layout.total()), g(layout.total());
  for (float& v : p) v = dist(rng);
  for (float& v : g) v = dist(rng);

  moetrain::CpuBackend<float> cpu;
  moetrain::CudaBackendOptions o;
  moetrain::CudaBackend gpu(o);
  const auto ref = muon_directions(cpu, cfg, p, g);
  const auto got = muon_directions(gpu, cfg, p, g);
  REQUIRE(got.size() == ref.size());
  int tall = 0, wide = 0;
  double worst = 0;
  std::size_t k = 0;
  for (const ParamTensor& t : layout.tensors()) {
    if (!moetrain::is_hidden_matrix(t.role)) continue;
    INFO(t.name);
    const int A = int(t.shape[0]), B = int(t.shape[1]);
    tall += A > B;
    wide += A < B;
    const std::vector<double>&r = ref[k], &c = got[k];
    ++k;
    double num = 0, den = 0;
    for (std::size_t i = 0; i < r.size(); ++i) {
      num += (c[i] - r[i]) * (c[i] - r[i]);
      den += r[i] * r[i];
    }
    // bf16 operands (2^-9 relative rounding) through five iterations whose slope at small
    // singular values is a = 3.4445: a few 2^-9 compounded; measured 0.027 at worst here.
    CHECK(std::sqrt(num / den) < 5e-2);
    worst = std::max(worst, std::sqrt(num / den));
    const std::vector<double> sv_ref = singular_values(r, A, B), sv = singular_values(c, A, B);
    for (double v : sv_ref) CHECK((v > 0.6 && v < 1.25));  // NS5's band (test_optimizer.cpp)
    for (double v : sv) CHECK((v > 0.6 && v < 1.25));
  }
  CHECK(tall > 0);
  CHECK(wide > 0);
  if (std::getenv("MOETRAIN_KERNEL_ERRORS"))
    std::printf("Newton-Schulz cuda vs cpu: worst relative error of O %.3g\n", worst);
}
