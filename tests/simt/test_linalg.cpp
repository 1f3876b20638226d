// The linear-algebra ops of SOAP's eigenbases on CudaBackend (kernels/linalg.cu around the dense
// solver: cuSOLVER on a GPU, LAPACK ordered on the stream in the simulator;
// src/backend/cuda/linalg.cpp), against matrices whose answer is known by construction and
// against CpuBackend<float> (src/backend/cpu/linalg.cpp):
//   * symmetric_eigenvectors_batched of P = U diag(lambda) U^T (U a random orthogonal matrix,
//     well-separated lambda): the columns are U's, by descending lambda, up to sign;
//   * qr_orthonormalize_batched: Q^T Q = I and Q^T A upper triangular, the CPU's Q up to column
//     signs;
//   * sort_eigenbasis: the CPU's permutation exactly, ties kept in order, NaN last, v's rows or
//     columns moved with it.
// Odd sizes (1, 5, 33) and batches of several matrices; every case under each stream schedule.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "backend/cuda/cuda_backend.hpp"
#include "kernel_test_util.hpp"
#include "moetrain/cpu_backend.hpp"

namespace {

using kernel_test::DeviceBuffer;
using moetrain::CpuBackend;
using moetrain::CudaBackend;
using moetrain::CudaBackendOptions;

const CudaBackendOptions kFp32{.bf16 = false};  // fp32 GEMMs: the CPU's precision

// A random n x n orthogonal matrix (row-major, double): Gram-Schmidt of Gaussian columns, twice.
std::vector<double> random_orthogonal(int n, std::mt19937& rng) {
  std::normal_distribution<double> normal(0.0, 1.0);
  const std::size_t N = std::size_t(n);
  std::vector<double> U(N * N);
  for (double& x : U) x = normal(rng);
  for (std::size_t j = 0; j < N; ++j) {
    for (int pass = 0; pass < 2; ++pass)
      for (std::size_t k = 0; k < j; ++k) {
        double d = 0;
        for (std::size_t r = 0; r < N; ++r) d += U[r * N + j] * U[r * N + k];
        for (std::size_t r = 0; r < N; ++r) U[r * N + j] -= d * U[r * N + k];
      }
    double s = 0;
    for (std::size_t r = 0; r < N; ++r) s += U[r * N + j] * U[r * N + j];
    s = std::sqrt(s);
    for (std::size_t r = 0; r < N; ++r) U[r * N + j] /= s;
  }
  return U;
}

// max |(Q^T Q - I)_ij| of one row-major n x n matrix.
double orthogonality_error(const float* Q, int n) {
  const std::size_t N = std::size_t(n);
  double worst = 0;
  for (std::size_t i = 0; i < N; ++i)
    for (std::size_t j = 0; j < N; ++j) {
      double d = 0;
      for (std::size_t r = 0; r < N; ++r) d += double(Q[r * N + i]) * Q[r * N + j];
      worst = std::max(worst, std::abs(d - (i == j ? 1.0 : 0.0)));
    }
  return worst;
}

// max over columns j of min over the sign s of max_r |Q[r, j] - s * R[r, j]|.
double column_error_up_to_sign(const float* Q, const double* R, int n) {
  const std::size_t N = std::size_t(n);
  double worst = 0;
  for (std::size_t j = 0; j < N; ++j) {
    double plus = 0, minus = 0;
    for (std::size_t r = 0; r < N; ++r) {
      plus = std::max(plus, std::abs(double(Q[r * N + j]) - R[r * N + j]));
      minus = std::max(minus, std::abs(double(Q[r * N + j]) + R[r * N + j]));
    }
    worst = std::max(worst, std::min(plus, minus));
  }
  return worst;
}

template <typename Run>
std::vector<float> on_gpu(std::size_t out_elems, Run run) {
  CudaBackend gpu(kFp32);
  DeviceBuffer<float> out(out_elems);
  out.poison();  // cudaMemset: the legacy stream, which the backend's stream does not wait for
  MOETRAIN_CUDA_CHECK(cudaDeviceSynchronize());
  run(gpu, out.ptr);
  gpu.synchronize();
  return out.download();
}

}  // namespace

TEST_CASE("cuda backend: symmetric_eigenvectors_batched finds the known eigenbasis, descending",
          "[cuda_backend][linalg]") {
  EACH_STREAM_SCHEDULE();
  for (const int n : {1, 5, 33}) {
    const int batch = 3;
    const std::size_t N = std::size_t(n), nn = N * N;
    INFO("n " << n << ", batch " << batch);
    std::mt19937 rng(unsigned(100 + n));
    std::vector<float> P(nn * batch);
    std::vector<std::vector<double>> expected(batch);  // columns by descending eigenvalue
    for (int b = 0; b < batch; ++b) {
      const std::vector<double> U = random_orthogonal(n, rng);
      // lambda_j = 1 + j + b (gaps of 1, positive definite like SOAP's Gram accumulators); column
      // j of U has lambda_j, so descending order is U's columns reversed.
      std::vector<double>& E = expected[std::size_t(b)];
      E.assign(nn, 0.0);
      for (std::size_t r = 0; r < N; ++r)
        for (std::size_t j = 0; j < N; ++j) E[r * N + j] = U[r * N + (N - 1 - j)];
      for (std::size_t r = 0; r < N; ++r)
        for (std::size_t c = 0; c < N; ++c) {
          double s = 0;
          for (std::size_t j = 0; j < N; ++j) s += U[r * N + j] * (1.0 + j + b) * U[c * N + j];
          P[b * nn + r * N + c] = float(s);
        }
    }
    std::vector<float> ref(nn * batch);
    CpuBackend<float> cpu;
    cpu.symmetric_eigenvectors_batched(ref.data(), P.data(), n, batch);
    DeviceBuffer<float> dP(P);
    const std::vector<float> got = on_gpu(nn * batch, [&](CudaBackend& be, float* Q) {
      be.symmetric_eigenvectors_batched(Q, dP.ptr, n, batch);
    });
    for (int b = 0; b < batch; ++b) {
      INFO("matrix " << b);
      const float* q = got.data() + b * nn;
      // fp32 solver on a matrix of norm <= n + 3 with unit gaps: errors of a few 1e-6 * n.
      CHECK(orthogonality_error(q, n) < 1e-5);
      CHECK(column_error_up_to_sign(q, expected[std::size_t(b)].data(), n) < 1e-4);
      CHECK(column_error_up_to_sign(ref.data() + b * nn, expected[std::size_t(b)].data(), n) <
            1e-4);
    }
  }
}

TEST_CASE("cuda backend: qr_orthonormalize_batched gives an orthonormal Q with Q^T A triangular",
          "[cuda_backend][linalg]") {
  EACH_STREAM_SCHEDULE();
  for (const int n : {1, 5, 33}) {
    const int batch = 2;
    const std::size_t N = std::size_t(n), nn = N * N;
    INFO("n " << n << ", batch " << batch);
    std::mt19937 rng(unsigned(200 + n));
    std::vector<float> A = kernel_test::random_floats(nn * batch, rng);
    for (int b = 0; b < batch; ++b)  // well conditioned: a dominant diagonal
      for (std::size_t i = 0; i < N; ++i) A[b * nn + i * N + i] += float(2 * n);
    std::vector<float> ref(nn * batch);
    CpuBackend<float> cpu;
    cpu.qr_orthonormalize_batched(ref.data(), A.data(), n, batch);
    DeviceBuffer<float> dA(A);
    const std::vector<float> got = on_gpu(nn * batch, [&](CudaBackend& be, float* Q) {
      be.qr_orthonormalize_batched(Q, dA.ptr, n, batch);
    });
    CHECK(dA.download() == A);  // the input is left as it was
    for (int b = 0; b < batch; ++b) {
      INFO("matrix " << b);
      const float* q = got.data() + b * nn;
      const float* a = A.data() + b * nn;
      CHECK(orthogonality_error(q, n) < 1e-5);
      double below = 0, norm = 0;  // R = Q^T A: nothing below its diagonal
      for (std::size_t i = 0; i < N; ++i)
        for (std::size_t j = 0; j < N; ++j) {
          double r = 0;
          for (std::size_t k = 0; k < N; ++k) r += double(q[k * N + i]) * a[k * N + j];
          norm = std::max(norm, std::abs(r));
          if (i > j) below = std::max(below, std::abs(r));
        }
      CHECK(below < 1e-5 * norm);
      std::vector<double> ref_d(ref.begin() + b * nn, ref.begin() + (b + 1) * nn);
      CHECK(column_error_up_to_sign(q, ref_d.data(), n) < 1e-5);
    }
  }
}

TEST_CASE("cuda backend: sort_eigenbasis permutes exactly as the CPU, ties stable, NaN last",
          "[cuda_backend][linalg]") {
  EACH_STREAM_SCHEDULE();
  const int n = 7, batch = 2;
  const std::size_t N = n, nn = N * N;
  std::mt19937 rng(300);
  std::vector<float> Q = kernel_test::random_floats(nn * batch, rng),
                     PQ = kernel_test::random_floats(nn * batch, rng);
  // Matrix 0: columns 2 and 5 identical in Q and in PQ (the same e: a tie); matrix 1: column 3 of
  // PQ NaN (e NaN: sorted last).
  for (std::size_t r = 0; r < N; ++r) {
    Q[r * N + 5] = Q[r * N + 2];
    PQ[r * N + 5] = PQ[r * N + 2];
    PQ[nn + r * N + 3] = std::numeric_limits<float>::quiet_NaN();
  }
  for (const bool rows_axis : {true, false}) {
    const int v_rows = rows_axis ? n : 4, v_cols = rows_axis ? 3 : n;
    const std::size_t ve = std::size_t(v_rows) * std::size_t(v_cols);
    INFO((rows_axis ? "v's rows" : "v's columns") << " permuted");
    const std::vector<float> v = kernel_test::iota_floats(ve * batch, 0.0f);
    std::vector<float> ref_s(nn * batch), ref_v(ve * batch);
    CpuBackend<float> cpu;
    cpu.sort_eigenbasis(ref_s.data(), ref_v.data(), Q.data(), PQ.data(), v.data(), n, batch, v_rows,
                        v_cols, rows_axis);
    // The reference's own order: e_j = sum_r Q[r, j] PQ[r, j] descending, stable, NaN last.
    for (int b = 0; b < batch; ++b) {
      std::vector<double> e(N, 0.0);
      for (std::size_t r = 0; r < N; ++r)
        for (std::size_t j = 0; j < N; ++j)
          e[j] += double(Q[b * nn + r * N + j]) * PQ[b * nn + r * N + j];
      std::vector<int> order(N);
      for (std::size_t j = 0; j < N; ++j) order[j] = int(j);
      std::stable_sort(order.begin(), order.end(), [&](int x, int y) {
        if (std::isnan(e[x]) != std::isnan(e[y])) return std::isnan(e[y]);
        return e[x] > e[y];
      });
      if (b == 1) CHECK(order.back() == 3);
      for (std::size_t j = 0; j < N; ++j) {
        INFO("matrix " << b << ", column " << j << " <- " << order[j]);
        CHECK(std::memcmp(&ref_s[b * nn + j], &PQ[b * nn + order[j]], sizeof(float)) == 0);
      }
    }
    for (const auto& sched : kernel_test::test_schedules()) {
      INFO("schedule " << sched.name());
      kernel_test::ScopedSchedule scope(sched);
      CudaBackend gpu(kFp32);
      DeviceBuffer<float> dQ(Q), dPQ(PQ), dv(v), ds(nn * batch), dvo(ve * batch);
      ds.poison();
      dvo.poison();
      MOETRAIN_CUDA_CHECK(cudaDeviceSynchronize());
      gpu.sort_eigenbasis(ds.ptr, dvo.ptr, dQ.ptr, dPQ.ptr, dv.ptr, n, batch, v_rows, v_cols,
                          rows_axis);
      gpu.synchronize();
      const std::vector<float> got_s = ds.download(), got_v = dvo.download();
      CHECK(std::memcmp(got_s.data(), ref_s.data(), nn * batch * sizeof(float)) == 0);
      CHECK(got_v == ref_v);
    }
  }
}

TEST_CASE(
    "cuda backend: the linear-algebra ops reject negative sizes and do nothing for empty ones",
    "[cuda_backend][linalg]") {
  CudaBackend gpu(kFp32);
  DeviceBuffer<float> a(4), b(4);
  CHECK_THROWS_AS(gpu.symmetric_eigenvectors_batched(a.ptr, b.ptr, -1, 1), std::invalid_argument);
  CHECK_THROWS_AS(gpu.qr_orthonormalize_batched(a.ptr, b.ptr, 2, -3), std::invalid_argument);
  CHECK_THROWS_AS(gpu.sort_eigenbasis(a.ptr, a.ptr, b.ptr, b.ptr, b.ptr, -2, 1, 2, 2, true),
                  std::invalid_argument);
  a.poison();
  MOETRAIN_CUDA_CHECK(cudaDeviceSynchronize());
  gpu.symmetric_eigenvectors_batched(a.ptr, b.ptr, 2, 0);
  gpu.qr_orthonormalize_batched(a.ptr, b.ptr, 0, 1);
  gpu.synchronize();
  CHECK(kernel_test::all_poison(a.download()));
}
