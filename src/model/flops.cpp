#include "moetrain/flops.hpp"

#include <chrono>
#include <vector>

#include "moetrain/rng.hpp"

namespace moetrain {

FlopCount flops_per_token(const ModelConfig& c) {
  FlopCount f;
  const double d = c.d_model, hd = c.head_dim, H = c.n_heads, Hkv = c.n_kv_heads;
  for (int l = 0; l < c.n_layers; ++l) {
    f.attn_proj += 2 * d * (H + 2 * Hkv) * hd + 2 * H * hd * d;
    f.attn_core += 2 * 2 * H * hd * (c.seq_len + 1) / 2.0;
    if (!is_moe_layer(c, l)) {
      f.ffn += 2 * 3 * d * c.dense_ff;
    } else {
      f.router += 2 * d * c.moe.n_experts;
      f.ffn += c.moe.top_k * 2 * 3 * d * c.moe.expert_ff;
      f.ffn += c.moe.n_shared_experts * 2 * 3 * d * c.moe.shared_ff;
    }
  }
  f.lm_head = 2 * d * c.vocab_size;
  return f;
}

double measure_gemm_peak_gflops(Backend<float>& be, int n) {
  using Clock = std::chrono::steady_clock;
  const std::size_t elems = std::size_t(n) * n;
  DeviceBuffer<float, float> a(be, elems), b(be, elems), c(be, elems);
  std::vector<float> host(elems);
  Rng rng(7);
  for (auto& v : host) v = float(rng.uniform() - 0.5);
  be.upload(a.get(), host.data(), elems * sizeof(float));
  be.upload(b.get(), host.data(), elems * sizeof(float));
  double best = 1e30;
  for (int rep = 0; rep < 4; ++rep) {
    const auto t0 = Clock::now();
    be.gemm(false, true, n, n, n, 1.f, a.get(), n, b.get(), n, 0.f, c.get(), n);
    float done = 0;  // a download waits for an asynchronous (GPU) backend to finish the GEMM
    be.download(&done, c.get(), sizeof done);
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    if (rep > 0) best = std::min(best, s);
  }
  return 2.0 * n * double(n) * n / best / 1e9;
}

}  // namespace moetrain
