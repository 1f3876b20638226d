// CudaBackend's linear-algebra ops (SOAP's eigenbases): the layout kernels of kernels/linalg.cu
// around cuSOLVER's dense solvers, all on the backend's stream. cuSOLVER takes column-major
// matrices: a symmetric input is its own transpose; a general one is transposed into the solver's
// buffer and the result back. The solvers' info values stay on the device (nothing is read back
// inside a step): their inputs are finite whenever a step is not skipped, and a skipped step
// discards what they produce.
// In the simulator build the same kernels run in the simulator and the solver's part runs on the
// host (src/backend/cpu/lapack.hpp), ordered on the stream as cuSOLVER's kernels would be.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "backend/cuda/cuda_backend.hpp"
#include "linalg.cuh"

#if defined(MOETRAIN_SIMT)
#include "backend/cpu/lapack.hpp"
#else
#include <cusolverDn.h>
#endif

namespace moetrain {

namespace {

#if !defined(MOETRAIN_SIMT)
void check_solver(cusolverStatus_t status, const char* what) {
  if (status != CUSOLVER_STATUS_SUCCESS)
    throw std::runtime_error(std::string("cuSOLVER ") + what + " failed: status " +
                             std::to_string(int(status)));
}
#endif

void check_square(const char* op, int n, int batch) {
  if (n < 0 || batch < 0)
    throw std::invalid_argument(std::string(op) + ": n " + std::to_string(n) + ", batch " +
                                std::to_string(batch) + " (both must be >= 0)");
}

}  // namespace

void* CudaBackend::solver() {
#if defined(MOETRAIN_SIMT)
  return nullptr;
#else
  if (!solver_) {
    refuse_in_capture("the cuSOLVER handle's creation");
    cusolverDnHandle_t h = nullptr;
    check_solver(cusolverDnCreate(&h), "create");
    solver_ = h;
    check_solver(cusolverDnSetStream(h, stream_), "set stream");
  }
  return solver_;
#endif
}

void CudaBackend::destroy_solver() {
#if !defined(MOETRAIN_SIMT)
  if (solver_) cusolverDnDestroy(static_cast<cusolverDnHandle_t>(solver_));
#endif
  solver_ = nullptr;
}

void CudaBackend::symmetric_eigenvectors_batched(float* Q, const float* P, int n, int batch) {
  check_square("symmetric_eigenvectors_batched", n, batch);
  if (!n || !batch) return;
  const std::size_t nn = std::size_t(n) * std::size_t(n), total = nn * std::size_t(batch);
  auto* a = static_cast<float*>(scratch(solver_a_, total * sizeof(float)));
  auto* w = static_cast<float*>(scratch(solver_w_, std::size_t(n) * batch * sizeof(float)));
  MOETRAIN_CUDA_CHECK(
      cudaMemcpyAsync(a, P, total * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
#if defined(MOETRAIN_SIMT)
  simt::enqueue_host(stream_, [=] {
    for (int b = 0; b < batch; ++b)
      lapack::symmetric_eigen(n, a + std::size_t(b) * nn, w + std::size_t(b) * std::size_t(n));
  });
#else
  auto h = static_cast<cusolverDnHandle_t>(solver());
  cusolverDnParams_t params = nullptr;
  check_solver(cusolverDnCreateParams(&params), "create params");
  std::size_t dev_bytes = 0, host_bytes = 0;
  check_solver(cusolverDnXsyevBatched_bufferSize(
                   h, params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, n, CUDA_R_32F, a, n,
                   CUDA_R_32F, w, CUDA_R_32F, &dev_bytes, &host_bytes, batch),
               "syevBatched buffer size");
  void* ws = scratch(solver_ws_, dev_bytes);
  auto* info = static_cast<int*>(scratch(solver_info_, std::size_t(batch) * sizeof(int)));
  if (solver_host_ws_.size() < host_bytes) solver_host_ws_.resize(host_bytes);
  check_solver(cusolverDnXsyevBatched(h, params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER,
                                      n, CUDA_R_32F, a, n, CUDA_R_32F, w, CUDA_R_32F, ws, dev_bytes,
                                      solver_host_ws_.data(), host_bytes, info, batch),
               "syevBatched");
  cusolverDnDestroyParams(params);
  kernels::host_launch_count() += 1;
#endif
  // Column j of each column-major result is the eigenvector of the j-th smallest eigenvalue.
  kernels::transpose_square(Q, a, n, batch, /*reverse_columns=*/true, stream_);
  wrote(Q, total * sizeof(float));
}

void CudaBackend::qr_orthonormalize_batched(float* Q, const float* A, int n, int batch) {
  check_square("qr_orthonormalize_batched", n, batch);
  if (!n || !batch) return;
  const std::size_t nn = std::size_t(n) * std::size_t(n), total = nn * std::size_t(batch);
  auto* a = static_cast<float*>(scratch(solver_a_, total * sizeof(float)));
  auto* tau = static_cast<float*>(scratch(solver_w_, std::size_t(n) * sizeof(float)));
  kernels::transpose_square(a, A, n, batch, false, stream_);
#if defined(MOETRAIN_SIMT)
  (void)tau;
  simt::enqueue_host(stream_, [=] {
    for (int b = 0; b < batch; ++b) lapack::qr_q(n, a + std::size_t(b) * nn);
  });
#else
  // cuSOLVER has no batched QR: one geqrf + orgqr per matrix, all on the stream.
  auto h = static_cast<cusolverDnHandle_t>(solver());
  int lwork_geqrf = 0, lwork_orgqr = 0;
  check_solver(cusolverDnSgeqrf_bufferSize(h, n, n, a, n, &lwork_geqrf), "geqrf buffer size");
  check_solver(cusolverDnSorgqr_bufferSize(h, n, n, n, a, n, tau, &lwork_orgqr),
               "orgqr buffer size");
  const int lwork = std::max(lwork_geqrf, lwork_orgqr);
  auto* ws = static_cast<float*>(scratch(solver_ws_, std::size_t(lwork) * sizeof(float)));
  auto* info = static_cast<int*>(scratch(solver_info_, sizeof(int)));
  for (int b = 0; b < batch; ++b) {
    float* ab = a + std::size_t(b) * nn;
    check_solver(cusolverDnSgeqrf(h, n, n, ab, n, tau, ws, lwork, info), "geqrf");
    check_solver(cusolverDnSorgqr(h, n, n, n, ab, n, tau, ws, lwork, info), "orgqr");
  }
  kernels::host_launch_count() += 2 * std::uint64_t(batch);
#endif
  kernels::transpose_square(Q, a, n, batch, false, stream_);
  wrote(Q, total * sizeof(float));
}

void CudaBackend::sort_eigenbasis(float* sorted, float* v_out, const float* Q, const float* PQ,
                                  const float* v, int n, int batch, int v_rows, int v_cols,
                                  bool v_rows_axis) {
  check_square("sort_eigenbasis", n, batch);
  if (!n || !batch) return;
  void* ws = scratch(op_scratch_, kernels::sort_eigenbasis_workspace_bytes(n, batch));
  kernels::sort_eigenbasis(sorted, v_out, Q, PQ, v, n, batch, v_rows, v_cols, v_rows_axis, ws,
                           stream_);
  wrote(sorted, std::size_t(n) * std::size_t(n) * std::size_t(batch) * sizeof(float));
  wrote(v_out, std::size_t(v_rows) * std::size_t(v_cols) * std::size_t(batch) * sizeof(float));
}

}  // namespace moetrain
