// tests/simt/test_attention.cpp — kernels/attention.cu (causal softmax of unfused attention) in the
// SIMT simulator against a double-precision reference written from the definition (the one of
// src/backend/cpu/attention.cpp): P and dS within 1e-5, exact zeros above the diagonal, rows of P
// summing to 1 and rows of dS to 0, smax exact and blind to huge or NaN logits above the diagonal
// (and negative for a head whose logits all are), in place (P over S, dS over dP) and not, with
// seq = 1, seq not a multiple of the warp, NaN-poisoned outputs and workspace, several schedules.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

#include "attention.cuh"
#include "kernel_test_util.hpp"

namespace {

using namespace kernel_test;

struct Shape {
  int batch, heads, seq;
  size_t rows() const { return size_t(batch) * heads * seq; }
  size_t elems() const { return rows() * seq; }
};

double g_max_err = 0;

void reference_forward(const Shape& sh, const std::vector<float>& S, std::vector<float>& P,
                       std::vector<float>& smax) {
  P.assign(sh.elems(), 0.0f);
  smax.assign(sh.heads, -std::numeric_limits<float>::infinity());
  for (size_t row = 0; row < sh.rows(); ++row) {
    const int i = int(row % sh.seq), h = int(row / sh.seq % sh.heads);
    const float* s = S.data() + row * sh.seq;
    const float m = *std::max_element(s, s + i + 1);
    smax[h] = std::max(smax[h], m);
    double sum = 0;
    for (int j = 0; j <= i; ++j) sum += std::exp(double(s[j]) - m);
    for (int j = 0; j <= i; ++j) P[row * sh.seq + j] = float(std::exp(double(s[j]) - m) / sum);
  }
}

std::vector<float> reference_backward(const Shape& sh, const std::vector<float>& dP,
                                      const std::vector<float>& P) {
  std::vector<float> dS(sh.elems(), 0.0f);
  for (size_t row = 0; row < sh.rows(); ++row) {
    const int i = int(row % sh.seq);
    const size_t o = row * sh.seq;
    double dot = 0;
    for (int j = 0; j <= i; ++j) dot += double(P[o + j]) * dP[o + j];
    for (int j = 0; j <= i; ++j) dS[o + j] = float(P[o + j] * (dP[o + j] - dot));
  }
  return dS;
}

// Garbage above the diagonal of S: NaN, a huge logit, +inf (smax must not see them).
float masked_logit(size_t k) {
  switch (k % 3) {
    case 0:
      return std::numeric_limits<float>::quiet_NaN();
    case 1:
      return 1e30f;
    default:
      return std::numeric_limits<float>::infinity();
  }
}

// Every entry of `out` above the diagonal is exactly 0, and the rows' sums over j <= i.
std::vector<double> check_rows(const Shape& sh, const std::vector<float>& out, size_t& nonzero) {
  std::vector<double> sums(sh.rows(), 0.0);
  nonzero = 0;
  for (size_t row = 0; row < sh.rows(); ++row) {
    const int i = int(row % sh.seq);
    for (int j = 0; j < sh.seq; ++j) {
      const float v = out[row * sh.seq + j];
      if (j <= i) {
        sums[row] += v;
      } else {
        nonzero += v != 0.0f;
      }
    }
  }
  return sums;
}

void run_case(const Shape& sh, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> S(sh.elems()), dP(sh.elems());
  for (size_t row = 0; row < sh.rows(); ++row) {
    const int i = int(row % sh.seq), h = int(row / sh.seq % sh.heads);
    const float shift = h == 1 ? -20.0f : 0.0f;  // head 1: every logit negative, so is smax
    for (int j = 0; j < sh.seq; ++j) {
      const size_t k = row * sh.seq + j;
      S[k] = j <= i ? 3.0f * normal(rng) + shift : masked_logit(k);
      dP[k] = j <= i ? normal(rng) : 1e6f;
    }
  }
  std::vector<float> r_P, r_smax;
  reference_forward(sh, S, r_P, r_smax);
  const std::vector<float> r_dS = reference_backward(sh, dP, r_P);

  DeviceBuffer<float> d_S(S), d_P(sh.elems()), d_dP(dP), d_dS(sh.elems()), d_Pin(r_P),
      d_smax(size_t(sh.heads));
  DeviceBuffer<char> d_ws(mk::causal_softmax_workspace_bytes(sh.batch, sh.heads, sh.seq));
  for (const Schedule& s : test_schedules()) {
    ScopedSchedule scope(s);
    for (const bool in_place : {false, true}) {
      INFO("batch " << sh.batch << " heads " << sh.heads << " seq " << sh.seq
                    << (in_place ? " in place" : "") << " schedule " << s.name());
      d_S.upload(S);
      d_dP.upload(dP);
      d_P.poison();
      d_dS.poison();
      d_smax.poison();
      d_ws.poison();
      float* P = in_place ? d_S.ptr : d_P.ptr;
      float* dS = in_place ? d_dP.ptr : d_dS.ptr;
      mk::causal_softmax_forward(P, d_smax.ptr, d_S.ptr, sh.batch, sh.heads, sh.seq, d_ws.ptr,
                                 nullptr);
      // The backward takes the reference P, so that its check does not depend on the forward's.
      mk::causal_softmax_backward(dS, d_dP.ptr, d_Pin.ptr, sh.batch, sh.heads, sh.seq, nullptr);
      const std::vector<float> p = (in_place ? d_S : d_P).download();
      const std::vector<float> ds = (in_place ? d_dP : d_dS).download();
      REQUIRE_FALSE(has_nan(p));
      REQUIRE_FALSE(has_nan(ds));
      CHECK(d_smax.download() == r_smax);

      const double e_f = rel_error(p, r_P), e_b = rel_error(ds, r_dS);
      INFO("errors: forward " << e_f << " backward " << e_b);
      CHECK(e_f <= 1e-5);
      CHECK(e_b <= 1e-5);
      g_max_err = std::max({g_max_err, e_f, e_b});

      size_t nonzero_p = 0, nonzero_ds = 0;
      const std::vector<double> p_sums = check_rows(sh, p, nonzero_p);
      const std::vector<double> ds_sums = check_rows(sh, ds, nonzero_ds);
      CHECK(nonzero_p == 0);
      CHECK(nonzero_ds == 0);
      double worst_p = 0, worst_ds = 0;
      for (const double v : p_sums) worst_p = std::max(worst_p, std::fabs(v - 1.0));
      for (const double v : ds_sums) worst_ds = std::max(worst_ds, std::fabs(v));
      INFO("worst |row sum - 1| of P " << worst_p << ", worst |row sum| of dS " << worst_ds);
      CHECK(worst_p <= 1e-5);
      CHECK(worst_ds <= 1e-5);
    }
  }
}

}  // namespace

TEST_CASE("attention kernels: causal softmax forward and backward match the reference",
          "[simt][kernels][attention]") {
  g_max_err = 0;
  const Shape shapes[] = {
      {1, 1, 1},    // one key
      {2, 3, 37},   // rows longer than the warp, a partial last block of rows
      {1, 2, 64},   // two full rounds of the warp
      {3, 2, 5},    // several batches per head
      {1, 1, 100},  // four rounds, 13 blocks
  };
  unsigned seed = 1;
  for (const Shape& sh : shapes) run_case(sh, seed++);
  if (std::getenv("MOETRAIN_KERNEL_ERRORS"))
    std::printf("attention kernels: max relative error %.3g\n", g_max_err);
}

TEST_CASE("attention kernels: empty shapes launch nothing", "[simt][kernels][attention]") {
  CHECK(mk::causal_softmax_workspace_bytes(0, 4, 8) == 0);
  CHECK_NOTHROW(mk::causal_softmax_forward(nullptr, nullptr, nullptr, 0, 4, 8, nullptr, nullptr));
  CHECK_NOTHROW(mk::causal_softmax_forward(nullptr, nullptr, nullptr, 2, 4, 0, nullptr, nullptr));
  CHECK_NOTHROW(mk::causal_softmax_backward(nullptr, nullptr, nullptr, 2, 0, 8, nullptr));
}
