// tests/simt/test_flash_attention.cpp — kernels/flash_attention.cu (causal flash attention on
// mma.sync) in the SIMT simulator against the CPU backend's attention on the same bf16-rounded
// q, k, v: the output and dq, dk, dv within the bf16 tolerance (and the gradients bit-identical
// run to run), S_max equal (to fp32 rounding) to a brute-force maximum of q_i . k_j / sqrt(hd)
// over the batch and j <= i, and the saved logsumexp against a double-precision evaluation; MHA and
// GQA (4 query heads per kv head), head_dim 64 and 128, sequences of 1, 17, 64 and 129 (one,
// several and partial query blocks), batch 2, outputs poisoned with NaN first, under several
// schedules.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "flash_attention.cuh"
#include "kernel_test_util.hpp"
#include "moetrain/cpu_backend.hpp"

namespace {

using namespace kernel_test;

struct Case {
  int batch, seq, heads, kv_heads, hd;
};

void run_case(const Case& c, unsigned seed) {
  const int B = c.batch, T = c.seq, H = c.heads, KV = c.kv_heads, hd = c.hd;
  const int W = (H + 2 * KV) * hd, Wo = H * hd;
  const size_t rows = size_t(B) * T;
  std::mt19937 rng(seed);
  // Logits of a few units: a softmax that is neither flat nor one-hot.
  const std::vector<float> qkv = representable<bf16>(random_floats(rows * W, rng, 1.2f));

  const moetrain::AttentionShape shape{B, T, H, KV, hd};
  moetrain::CpuBackend<float> cpu;
  std::vector<float> ref_out(rows * Wo), probs(cpu.attention_saved_elems(shape)), ref_smax(H);
  cpu.attention_forward(ref_out.data(), probs.data(), ref_smax.data(), qkv.data(), shape);
  const std::vector<float> dout = representable<bf16>(random_floats(rows * Wo, rng));
  std::vector<float> ref_dqkv(rows * W);
  cpu.attention_backward(ref_dqkv.data(), dout.data(), qkv.data(), ref_out.data(), probs.data(),
                         shape);
  // The three parts of dqkv, compared on their own (dk and dv sum a GQA group's heads).
  const auto part = [&](const std::vector<float>& x, int col0, int cols) {
    std::vector<float> out;
    for (size_t r = 0; r < rows; ++r)
      out.insert(out.end(), x.begin() + std::ptrdiff_t(r * W + size_t(col0)),
                 x.begin() + std::ptrdiff_t(r * W + size_t(col0 + cols)));
    return out;
  };

  // Brute force, in double: S_max and the logsumexp of each row.
  const double scale = 1.0 / std::sqrt(double(hd));
  std::vector<double> smax(H, -std::numeric_limits<double>::infinity()), lse(size_t(B) * H * T);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const int g = h / (H / KV);
      for (int i = 0; i < T; ++i) {
        std::vector<double> s(size_t(i) + 1);
        for (int j = 0; j <= i; ++j) {
          double dot = 0;
          for (int d = 0; d < hd; ++d)
            dot += double(qkv[(size_t(b) * T + i) * W + size_t(h) * hd + d]) *
                   double(qkv[(size_t(b) * T + j) * W + size_t(H + g) * hd + d]);
          s[size_t(j)] = dot * scale;
        }
        const double m = *std::max_element(s.begin(), s.end());
        smax[size_t(h)] = std::max(smax[size_t(h)], m);
        double sum = 0;
        for (double x : s) sum += std::exp(x - m);
        lse[(size_t(b) * H + h) * T + i] = m + std::log(sum);
      }
    }

  DeviceBuffer<bf16> d_qkv(to_storage<bf16>(qkv)), d_out(rows * Wo), d_dout(to_storage<bf16>(dout)),
      d_dqkv(rows * W);
  DeviceBuffer<float> d_lse(size_t(B) * H * T), d_smax(static_cast<size_t>(H));
  const mk::FlashShape fs{B, T, H, KV, hd};
  DeviceBuffer<unsigned char> d_ws(mk::flash_attention_workspace_bytes(fs)),
      d_bws(mk::flash_attention_backward_workspace_bytes(fs));
  std::vector<bf16> first_dqkv;
  for (const Schedule& s : test_schedules()) {
    ScopedSchedule scope(s);
    INFO("batch " << B << " seq " << T << " heads " << H << "/" << KV << " hd " << hd
                  << " schedule " << s.name());
    d_out.poison();
    d_lse.poison();
    d_smax.poison();
    d_ws.poison();
    mk::flash_attention_forward(d_out.ptr, d_lse.ptr, d_smax.ptr, d_qkv.ptr, fs, d_ws.ptr, nullptr);
    const auto out = to_float(d_out.download());
    const auto got_lse = d_lse.download(), got_smax = d_smax.download();
    REQUIRE_FALSE(has_nan(out));
    REQUIRE_FALSE(has_nan(got_lse));
    REQUIRE_FALSE(has_nan(got_smax));
    const double e_out = rel_error(out, ref_out);
    INFO("output relative error " << e_out);
    CHECK(e_out <= 2e-2);
    for (int h = 0; h < H; ++h) {
      INFO("head " << h << ": S_max " << got_smax[size_t(h)] << ", brute force " << smax[size_t(h)]
                   << ", CPU backend " << ref_smax[size_t(h)]);
      CHECK(std::fabs(got_smax[size_t(h)] - smax[size_t(h)]) <=
            1e-5 * std::max(1.0, std::fabs(smax[size_t(h)])));
    }
    double e_lse = 0;
    for (size_t i = 0; i < lse.size(); ++i)
      e_lse = std::max(e_lse, std::fabs(double(got_lse[i]) - lse[i]));
    INFO("logsumexp max abs error " << e_lse);
    CHECK(e_lse <= 1e-4);

    d_dqkv.poison();
    d_bws.poison();
    mk::flash_attention_backward(d_dqkv.ptr, d_dout.ptr, d_qkv.ptr, d_out.ptr, d_lse.ptr, fs,
                                 d_bws.ptr, nullptr);
    const auto dqkv_bits = d_dqkv.download();
    const auto dqkv = to_float(dqkv_bits);
    REQUIRE_FALSE(has_nan(dqkv));
    const auto ref_dv = part(ref_dqkv, (H + KV) * hd, KV * hd);
    const double e_dv = rel_error(part(dqkv, (H + KV) * hd, KV * hd), ref_dv);
    // At T = 1 each softmax has one entry: the exact dq and dk are zero, and both backends give
    // rounding noise only (P (dP - D) with D = rowsum(dO o O) = dP up to rounding). There the
    // error is measured against the gradient's scale, dv's norm, instead of the noise's own.
    auto grad_error = [&](const std::vector<float>& got, const std::vector<float>& ref) {
      if (T > 1) return rel_error(got, ref);
      double num = 0, den = 0;
      for (size_t i = 0; i < got.size(); ++i) num += (double(got[i]) - ref[i]) * (got[i] - ref[i]);
      for (float x : ref_dv) den += double(x) * x;
      return std::sqrt(num / den);
    };
    const double e_dq = grad_error(part(dqkv, 0, H * hd), part(ref_dqkv, 0, H * hd));
    const double e_dk = grad_error(part(dqkv, H * hd, KV * hd), part(ref_dqkv, H * hd, KV * hd));
    INFO("relative errors: dq " << e_dq << " dk " << e_dk << " dv " << e_dv);
    CHECK(e_dq <= 2e-2);
    CHECK(e_dk <= 2e-2);
    CHECK(e_dv <= 2e-2);
    // Deterministic: the same bits under every schedule (no atomics, fixed summation orders).
    if (first_dqkv.empty()) first_dqkv = dqkv_bits;
    CHECK(std::memcmp(first_dqkv.data(), dqkv_bits.data(), dqkv_bits.size() * sizeof(bf16)) == 0);
  }
}

}  // namespace

TEST_CASE("flash attention forward and backward match the CPU backend, with the exact S_max",
          "[simt][kernels][flash]") {
  const Case cases[] = {
      {2, 1, 4, 4, 64},     // one row
      {2, 17, 4, 1, 64},    // GQA, one partial query block
      {2, 64, 4, 4, 128},   // exactly one block
      {2, 129, 4, 1, 64},   // GQA, three query blocks, the last of one row
      {1, 129, 2, 2, 128},  // hd 128 across blocks
      {2, 256, 4, 1, 128},  // GQA at hd 128, four full blocks
      {2, 70, 4, 2, 16},    // the small heads of configs/ci.json
      {2, 33, 2, 1, 32},
  };
  unsigned seed = 1;
  for (const Case& c : cases) run_case(c, seed++);
}

TEST_CASE("flash attention refuses unsupported shapes", "[simt][kernels][flash]") {
  DeviceBuffer<unsigned char> ws(1024);
  CHECK_THROWS_WITH(mk::flash_attention_forward(nullptr, nullptr, nullptr, nullptr,
                                                mk::FlashShape{1, 4, 2, 2, 96}, ws.ptr, nullptr),
                    Catch::Contains("head_dim 96 (16, 32, 64 or 128)"));
  CHECK_THROWS_WITH(mk::flash_attention_forward(nullptr, nullptr, nullptr, nullptr,
                                                mk::FlashShape{1, 4, 3, 2, 64}, ws.ptr, nullptr),
                    Catch::Contains("n_kv_heads"));
  CHECK_THROWS_WITH(mk::flash_attention_backward(nullptr, nullptr, nullptr, nullptr, nullptr,
                                                 mk::FlashShape{1, 4, 2, 2, 48}, ws.ptr, nullptr),
                    Catch::Contains("flash_attention_backward: head_dim 48"));
}
