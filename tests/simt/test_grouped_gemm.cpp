// tests/simt/test_grouped_gemm.cpp — kernels/grouped_gemm.cu (the MoE layer's grouped GEMM on
// mma.sync, offsets read on the device) in the SIMT simulator against the CPU backend's
// grouped_gemm on the same bf16 values: empty groups, groups of one row and of more rows than a
// tile, N and K not multiples of the tiles, both layouts of B, fp32 C with beta 0 and 0.5 (rows of
// C outside every group untouched), bf16 C; outputs poisoned with NaN first, several schedules.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "grouped_gemm.cuh"
#include "kernel_test_util.hpp"
#include "moetrain/cpu_backend.hpp"

namespace {

using namespace kernel_test;

template <typename TC>
void run_case(const std::vector<int>& group_rows, int N, int K, bool trans_b, float beta,
              unsigned seed) {
  const int groups = int(group_rows.size());
  std::vector<std::int32_t> offsets(size_t(groups) + 1, 0);
  for (int g = 0; g < groups; ++g)
    offsets[size_t(g) + 1] = offsets[size_t(g)] + group_rows[size_t(g)];
  const int used = offsets.back(), rows = used + 3;  // 3 rows past the groups: never written
  const int lda = K + 2, ldb = (trans_b ? K : N) + 1, ldc = N + 3;
  const size_t stride_b = size_t(trans_b ? N : K) * ldb + 5;
  std::mt19937 rng(seed);
  const auto A = representable<bf16>(random_floats(size_t(rows) * lda, rng));
  const auto B = representable<bf16>(random_floats(stride_b * size_t(groups), rng));
  const auto C0 = representable<TC>(random_floats(size_t(rows) * ldc, rng));
  moetrain::CpuBackend<float> cpu;
  std::vector<float> ref = C0;
  cpu.grouped_gemm(trans_b, used, N, K, 0.75f, A.data(), lda, B.data(), ldb, stride_b, beta,
                   ref.data(), ldc, offsets.data(), groups);
  DeviceBuffer<bf16> d_A(to_storage<bf16>(A)), d_B(to_storage<bf16>(B));
  DeviceBuffer<TC> d_C(size_t(rows) * ldc);
  DeviceBuffer<std::int32_t> d_off(offsets);
  for (const Schedule& s : test_schedules()) {
    ScopedSchedule scope(s);
    INFO("groups " << groups << " N " << N << " K " << K << " trans_b " << trans_b << " beta "
                   << beta << " C " << (std::is_same_v<TC, float> ? "fp32" : "bf16") << " schedule "
                   << s.name());
    d_C.upload(to_storage<TC>(C0));
    mk::grouped_gemm(trans_b, rows, N, K, 0.75f, d_A.ptr, lda, d_B.ptr, ldb, stride_b, beta,
                     d_C.ptr, ldc, d_off.ptr, groups, nullptr);
    const auto C = to_float(d_C.download());
    REQUIRE_FALSE(has_nan(C));
    std::vector<float> got, want;
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < ldc; ++c) {
        const size_t i = size_t(r) * ldc + size_t(c);
        if (r < used && c < N) {
          got.push_back(C[i]);
          want.push_back(ref[i]);
        } else {
          CHECK(C[i] == C0[i]);  // padding columns and rows of no group: untouched
        }
      }
    const double err = rel_error(got, want);
    INFO("relative error " << err);
    CHECK(err <= (std::is_same_v<TC, float> ? 1e-5 : 1e-2));
  }
}

void run_wgrad(const std::vector<int>& group_rows, int M, int N, unsigned seed) {
  const int groups = int(group_rows.size());
  std::vector<std::int32_t> offsets(size_t(groups) + 1, 0);
  for (int g = 0; g < groups; ++g)
    offsets[size_t(g) + 1] = offsets[size_t(g)] + group_rows[size_t(g)];
  const int rows = offsets.back(), lda = M + 1, ldb = N + 2, ldc = N + 3;
  const size_t stride_c = size_t(M) * ldc + 7;
  std::mt19937 rng(seed);
  const auto A = representable<bf16>(random_floats(size_t(std::max(rows, 1)) * lda, rng));
  const auto B = representable<bf16>(random_floats(size_t(std::max(rows, 1)) * ldb, rng));
  const auto C0 = random_floats(stride_c * size_t(groups), rng);
  moetrain::CpuBackend<float> cpu;
  std::vector<float> ref = C0;
  cpu.grouped_gemm_wgrad(rows, M, N, 0.5f, A.data(), lda, B.data(), ldb, ref.data(), ldc, stride_c,
                         offsets.data(), groups);
  DeviceBuffer<bf16> d_A(to_storage<bf16>(A)), d_B(to_storage<bf16>(B));
  DeviceBuffer<float> d_C(C0);
  DeviceBuffer<std::int32_t> d_off(offsets);
  std::vector<float> first;
  for (const Schedule& s : test_schedules()) {
    ScopedSchedule scope(s);
    INFO("wgrad groups " << groups << " M " << M << " N " << N << " schedule " << s.name());
    d_C.upload(C0);
    mk::grouped_gemm_wgrad(M, N, 0.5f, d_A.ptr, lda, d_B.ptr, ldb, d_C.ptr, ldc, stride_c,
                           d_off.ptr, groups, nullptr);
    const auto C = d_C.download();
    REQUIRE_FALSE(has_nan(C));
    CHECK(rel_error(C, ref) <= 1e-5);
    for (int g = 0; g < groups; ++g) {
      if (group_rows[size_t(g)] != 0) continue;  // a group without rows: exactly as it was
      const size_t base = size_t(g) * stride_c;
      for (size_t i = 0; i < size_t(M) * ldc; ++i) CHECK(C[base + i] == C0[base + i]);
    }
    if (first.empty()) first = C;
    CHECK(C == first);  // the same bits under every schedule
  }
}

}  // namespace

TEST_CASE("grouped GEMM weight gradients match the CPU backend, deterministically",
          "[simt][kernels][grouped]") {
  run_wgrad({0, 5, 70, 1, 33}, 37, 45, 11);
  run_wgrad({64, 0}, 64, 64, 12);
}

TEST_CASE("grouped GEMM kernel matches the CPU backend (offsets on the device)",
          "[simt][kernels][grouped]") {
  const std::vector<int> rows = {0, 5, 70, 0, 1, 129};  // empty, small, over a tile, one row
  run_case<float>(rows, 37, 45, true, 0.0f, 1);
  run_case<float>(rows, 37, 45, false, 0.0f, 2);
  run_case<float>(rows, 70, 16, true, 0.5f, 3);
  run_case<float>({64, 64}, 64, 64, false, 0.5f, 4);  // whole tiles only
  run_case<bf16>(rows, 19, 33, true, 0.0f, 5);
  run_case<float>({0, 0, 0}, 8, 8, true, 0.0f, 6);  // no rows at all: nothing written
}

TEST_CASE("grouped GEMM kernel refuses an empty sum", "[simt][kernels][grouped]") {
  CHECK_THROWS_WITH(mk::grouped_gemm<float>(true, 4, 4, 0, 1.0f, nullptr, 1, nullptr, 1, 0, 0.0f,
                                            nullptr, 4, nullptr, 1, nullptr),
                    Catch::Contains("K = 0"));
}
