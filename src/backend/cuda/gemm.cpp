// CudaBackend's GEMMs and its bf16 weight copy, and the backend's construction (the cuBLASLt
// handle lives with the GEMM).
//
// Row-major C = op(A) op(B) is the column-major C^T = op(B)^T op(A)^T, so cuBLASLt gets B as its
// first operand and A as its second, each with the transpose flag its row-major storage implies.
// In bf16 mode both operands are bf16 and the accumulation fp32 (CUBLAS_COMPUTE_32F); C stays fp32.
// Each distinct call (shapes, transposes, leading dimensions, batch strides, dtype, operand
// alignment) builds its descriptors, layouts and heuristic choice once and reuses them (GemmPlans);
// an empty sum (K = 0) is one scale_matrix launch, none when beta = 1.
// In the simulator build the same operand preparation runs (kernels in the simulator), and the
// product itself runs on the CPU backend in fp32 on the widened bf16 values: the numbers a tensor
// core would see, summed in fp32.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>

#include "backend/cuda/cuda_backend.hpp"
#include "elementwise.cuh"
#include "grouped_gemm.cuh"
#include "symmetric_gemm.cuh"

#if defined(MOETRAIN_SIMT)
#include "moetrain/cpu_backend.hpp"
#else
#include <cublasLt.h>
#endif

namespace moetrain {

namespace {

constexpr std::size_t kBlasWorkspaceBytes = std::size_t(32) << 20;

#if !defined(MOETRAIN_SIMT)
void check_blas(cublasStatus_t status, const char* what) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  throw std::runtime_error(std::string("cuBLASLt ") + what +
                           " failed: " + cublasLtGetStatusName(status) + " (" +
                           cublasLtGetStatusString(status) + ")");
}

// Largest power of two (up to 256) that divides the address: cuBLASLt's alignment preference.
std::uint32_t alignment_of(const void* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  std::uint32_t align = 256;
  while (align > 1 && a % align != 0) align /= 2;
  return align;
}

void set_batch(cublasLtMatrixLayout_t layout, int batch, std::size_t stride) {
  if (batch <= 1) return;
  const std::int32_t count = batch;
  const std::int64_t offset = std::int64_t(stride);
  check_blas(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count,
                                              sizeof count),
             "batch count");
  check_blas(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                              &offset, sizeof offset),
             "batch stride");
}

// What decides a cuBLASLt plan: the shapes, transposes, leading dimensions, batch strides, input
// type and the operands' alignment (the heuristic may pick a vectorised kernel only for aligned
// pointers).
struct GemmPlanKey {
  bool ta, tb, bf16, c_bf16;  // bf16 operands; a bf16 C (else fp32)
  int M, N, K, lda, ldb, ldc, batch;
  std::size_t sa, sb, sc;
  std::uint32_t align_a, align_b, align_c;
  bool operator==(const GemmPlanKey&) const = default;
};

struct GemmPlanKeyHash {
  std::size_t operator()(const GemmPlanKey& k) const {
    std::size_t h = 1469598103934665603ull;
    auto mix = [&](std::uint64_t v) { h = (h ^ v) * 1099511628211ull; };
    mix(std::uint64_t(k.ta) | std::uint64_t(k.tb) << 1 | std::uint64_t(k.bf16) << 2 |
        std::uint64_t(k.c_bf16) << 3);
    for (int v : {k.M, k.N, k.K, k.lda, k.ldb, k.ldc, k.batch})
      mix(std::uint64_t(std::uint32_t(v)));
    for (std::size_t v : {k.sa, k.sb, k.sc}) mix(v);
    mix(std::uint64_t(k.align_a) | std::uint64_t(k.align_b) << 16 | std::uint64_t(k.align_c) << 32);
    return h;
  }
};

// One cached cuBLASLt call: descriptors, layouts and the algorithm the heuristic chose, built the
// first time a key is seen and reused for every later call with that key.
struct GemmPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  GemmPlan() = default;
  GemmPlan(const GemmPlan&) = delete;
  GemmPlan& operator=(const GemmPlan&) = delete;
  ~GemmPlan() {
    for (auto* l : {a, b, c})
      if (l) cublasLtMatrixLayoutDestroy(l);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

// Descriptors, layouts and the heuristic's algorithm for `k`: alignment preferences from the
// real pointers, at most `ws_bytes` of workspace.
std::unique_ptr<GemmPlan> make_plan(cublasLtHandle_t handle, std::uint64_t ws_bytes,
                                    const GemmPlanKey& k) {
  const cudaDataType_t in_type = k.bf16 ? CUDA_R_16BF : CUDA_R_32F;
  auto plan = std::make_unique<GemmPlan>();
  check_blas(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "desc");
  const cublasOperation_t op_first = k.tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_second = k.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  check_blas(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_first,
                                            sizeof op_first),
             "transa");
  check_blas(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_second,
                                            sizeof op_second),
             "transb");
  // Column-major views: B is [N x K] (or [K x N] stored, transposed), A is [K x M] (or [M x K]).
  check_blas(
      cublasLtMatrixLayoutCreate(&plan->a, in_type, k.tb ? k.K : k.N, k.tb ? k.N : k.K, k.ldb),
      "layout");
  check_blas(
      cublasLtMatrixLayoutCreate(&plan->b, in_type, k.ta ? k.M : k.K, k.ta ? k.K : k.M, k.lda),
      "layout");
  check_blas(
      cublasLtMatrixLayoutCreate(&plan->c, k.c_bf16 ? CUDA_R_16BF : CUDA_R_32F, k.N, k.M, k.ldc),
      "layout");
  set_batch(plan->a, k.batch, k.sb);
  set_batch(plan->b, k.batch, k.sa);
  set_batch(plan->c, k.batch, k.sc);
  cublasLtMatmulPreference_t pref = nullptr;
  check_blas(cublasLtMatmulPreferenceCreate(&pref), "preference");
  struct PrefGuard {
    cublasLtMatmulPreference_t p;
    ~PrefGuard() { cublasLtMatmulPreferenceDestroy(p); }
  } guard{pref};
  check_blas(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                  &ws_bytes, sizeof ws_bytes),
             "workspace size");
  // cuBLASLt's first operand is our B, its second our A.
  for (const auto& [attr, align] :
       {std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, k.align_b},
        std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, k.align_a},
        std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, k.align_c},
        std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, k.align_c}})
    check_blas(cublasLtMatmulPreferenceSetAttribute(pref, attr, &align, sizeof align), "alignment");
  cublasLtMatmulHeuristicResult_t heuristic{};
  int found = 0;
  check_blas(cublasLtMatmulAlgoGetHeuristic(handle, plan->desc, plan->a, plan->b, plan->c, plan->c,
                                            pref, 1, &heuristic, &found),
             "heuristic");
  if (found == 0)
    throw std::runtime_error("cuBLASLt has no algorithm for a " + std::to_string(k.M) + "x" +
                             std::to_string(k.N) + "x" + std::to_string(k.K) + " GEMM");
  plan->algo = heuristic.algo;
  return plan;
}
#endif

}  // namespace

#if !defined(MOETRAIN_SIMT)
struct CudaBackend::GemmPlans {
  std::unordered_map<GemmPlanKey, std::unique_ptr<GemmPlan>, GemmPlanKeyHash> plans;
};
#else
struct CudaBackend::GemmPlans {};
#endif

CudaBackend::CudaBackend(const CudaBackendOptions& options)
    : bf16_(options.bf16),
      stochastic_(options.stochastic_weight_rounding),
      seed_(options.seed),
      plans_(std::make_unique<GemmPlans>()),
      graphs_(options.graphs) {
  if (options.device >= 0) MOETRAIN_CUDA_CHECK(cudaSetDevice(options.device));
  MOETRAIN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
#if !defined(MOETRAIN_SIMT)
  cublasLtHandle_t handle = nullptr;
  check_blas(cublasLtCreate(&handle), "create");
  blas_ = handle;
  scratch(blas_workspace_, kBlasWorkspaceBytes);
#endif
}

CudaBackend::~CudaBackend() {
  cudaStreamSynchronize(stream_);
  drop_recordings();
  for (cudaEvent_t e : markers_) cudaEventDestroy(e);
  plans_.reset();  // their descriptors before the handle
  destroy_solver();
#if !defined(MOETRAIN_SIMT)
  if (blas_) cublasLtDestroy(static_cast<cublasLtHandle_t>(blas_));
#endif
  for (Scratch* s : {&blas_workspace_, &op_scratch_, &gemm_a_, &gemm_b_, &sim_a_, &sim_b_, &sim_c_,
                     &attention_qkv_, &attention_out_, &attention_dout_, &attention_dqkv_,
                     &solver_a_, &solver_w_, &solver_ws_, &solver_info_})
    if (s->ptr) cudaFree(s->ptr);
  if (weight_copy_) cudaFree(weight_copy_);
  if (staging_) cudaFreeHost(staging_);
  cudaStreamDestroy(stream_);
}

void CudaBackend::set_weights(const float* weights, std::size_t count) {
  refuse_in_capture("set_weights");
  drop_recordings();
  weights_ = weights;
  weight_count_ = count;
  if (weight_copy_) {
    synchronize();
    MOETRAIN_CUDA_CHECK(cudaFree(weight_copy_));
    weight_copy_ = nullptr;
  }
  if (bf16_ && count)
    MOETRAIN_CUDA_CHECK(
        cudaMalloc(reinterpret_cast<void**>(&weight_copy_), count * sizeof(__nv_bfloat16)));
  weight_copy_stale_ = true;
}

const __nv_bfloat16* CudaBackend::weight_copy() {
  if (!weight_copy_) return nullptr;
  if (weight_copy_stale_) {
    if (stochastic_) {
      // A fresh stream of random bits per rewrite (deterministic from the seed), so rounding
      // errors do not repeat from step to step.
      const std::uint64_t seed = seed_ ^ (0x9e3779b97f4a7c15ull * ++weight_copy_version_);
      kernels::convert_to_bf16_stochastic(weight_copy_, weights_, weight_count_, seed, stream_);
    } else {
      // Rows of kRow (the strided kernel's rows are ints), then the tail.
      constexpr std::size_t kRow = 4096;
      const std::size_t rows = weight_count_ / kRow, tail = weight_count_ % kRow;
      kernels::convert_to_bf16(weight_copy_, int(kRow), weights_, int(kRow), int(rows), int(kRow),
                               stream_);
      if (tail)
        kernels::convert_to_bf16(weight_copy_ + rows * kRow, int(tail), weights_ + rows * kRow,
                                 int(tail), 1, int(tail), stream_);
    }
    weight_copy_stale_ = false;
  }
  return weight_copy_;
}

const void* CudaBackend::gemm_operand(CDevPtr X, bool trans, int rows, int cols, int ld,
                                      std::size_t stride, int batch, bool bf16_operand,
                                      Scratch& buf) {
  // The stored span of the operand (row-major): op(X) is rows x cols.
  const int srows = trans ? cols : rows, scols = trans ? rows : cols;
  const std::size_t span = std::size_t(batch - 1) * stride + std::size_t(srows - 1) * ld + scols;
  if (X.storage() == Storage::BF16) {
    if (bf16_operand) return X.get();
    // An fp32 product of bf16 activations: widened (exactly) into a packed buffer.
    auto* out = static_cast<float*>(scratch(buf, span * sizeof(float)));
    kernels::convert_from_bf16(out, device_ptr<__nv_bfloat16>(X), span, stream_);
    return out;
  }
  const float* x = X.as<const float>();
  if (!bf16_operand) return x;
  if (weight_copy_ && x >= weights_ && x < weights_ + weight_count_)
    return weight_copy() + (x - weights_);
  // fp32 data in a bf16 product (attention's probabilities, the router's gradients, optimizer
  // workspaces): rounded to nearest into a packed buffer with the caller's ld and stride kept, so
  // the GEMM call is the same as for the fp32 data.
  auto* out = static_cast<__nv_bfloat16*>(scratch(buf, span * sizeof(__nv_bfloat16)));
  if (batch == 1 || stride == std::size_t(srows) * std::size_t(ld)) {
    kernels::convert_to_bf16(out, ld, x, ld, srows * batch, scols, stream_);
  } else {
    for (int i = 0; i < batch; ++i)
      kernels::convert_to_bf16(out + std::size_t(i) * stride, ld, x + std::size_t(i) * stride, ld,
                               srows, scols, stream_);
  }
  return out;
}

bool CudaBackend::is_weight(CDevPtr X) const {
  if (!weights_ || X.storage() != Storage::F32) return false;
  const auto* x = static_cast<const float*>(X.get());
  return x >= weights_ && x < weights_ + weight_count_;
}

void CudaBackend::gemm(bool ta, bool tb, int M, int N, int K, float alpha, CDevPtr A, int lda,
                       CDevPtr B, int ldb, float beta, DevPtr C, int ldc) {
  gemm_impl(ta, tb, M, N, K, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1);
}

void CudaBackend::gemm_batched(bool ta, bool tb, int M, int N, int K, float alpha, CDevPtr A,
                               int lda, std::size_t sa, CDevPtr B, int ldb, std::size_t sb,
                               float beta, DevPtr C, int ldc, std::size_t sc, int batch) {
  gemm_impl(ta, tb, M, N, K, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, batch);
}

// A grouped GEMM operand as bf16: the activation itself, the bf16 weight copy, or fp32 data
// rounded into `buf` (fp32 mode: the tensor-core kernels take bf16 only).
const __nv_bfloat16* CudaBackend::bf16_operand(CDevPtr X, int rows, int cols, int ld,
                                               std::size_t stride, int batch, Scratch& buf) {
  return static_cast<const __nv_bfloat16*>(
      gemm_operand(X, false, rows, cols, ld, stride, batch, true, buf));
}

// C *= beta over rows x N (row stride ldc): a product of an empty sum (K = 0), with BLAS's beta
// semantics (beta = 0 writes zeros without reading C); nothing when beta = 1. A grouped product's
// groups cover every row (offsets[groups] == rows).
void CudaBackend::scale_rows(DevPtr C, int rows, int N, int ldc, float beta) {
  if (beta == 1.0f) return;
  if (C.storage() == Storage::BF16)
    kernels::scale_matrix(device_ptr<__nv_bfloat16>(C), ldc, rows, N, beta, stream_);
  else
    kernels::scale_matrix(C.as<float>(), ldc, rows, N, beta, stream_);
}

// One launch for all groups (kernels/grouped_gemm.cu): each block finds its group and row tile
// from the offsets on the device, so the host never reads them.
void CudaBackend::grouped_gemm(bool tb, int rows, int N, int K, float alpha, CDevPtr A, int lda,
                               CDevPtr B, int ldb, std::size_t sb, float beta, DevPtr C, int ldc,
                               const std::int32_t* offsets, int groups) {
  if (rows <= 0 || N <= 0 || groups <= 0) return;
  wrote(C.get(), (std::size_t(rows - 1) * ldc + N) * C.element_bytes());
  if (K <= 0) return scale_rows(C, rows, N, ldc, beta);
  const __nv_bfloat16* a = bf16_operand(A, rows, K, lda, 0, 1, gemm_a_);
  const __nv_bfloat16* b = bf16_operand(B, tb ? N : K, tb ? K : N, ldb, sb, groups, gemm_b_);
  if (C.storage() == Storage::BF16)
    kernels::grouped_gemm(tb, rows, N, K, alpha, a, lda, b, ldb, sb, beta,
                          device_ptr<__nv_bfloat16>(C), ldc, offsets, groups, stream_);
  else
    kernels::grouped_gemm(tb, rows, N, K, alpha, a, lda, b, ldb, sb, beta, C.as<float>(), ldc,
                          offsets, groups, stream_);
}

void CudaBackend::grouped_gemm_wgrad(int rows, int M, int N, float alpha, CDevPtr A, int lda,
                                     CDevPtr B, int ldb, DevPtr C, int ldc, std::size_t sc,
                                     const std::int32_t* offsets, int groups) {
  if (rows <= 0 || M <= 0 || N <= 0 || groups <= 0) return;
  wrote(C.get(), (std::size_t(groups - 1) * sc + std::size_t(M - 1) * ldc + N) * C.element_bytes());
  const __nv_bfloat16* a = bf16_operand(A, rows, M, lda, 0, 1, gemm_a_);
  const __nv_bfloat16* b = bf16_operand(B, rows, N, ldb, 0, 1, gemm_b_);
  if (C.storage() == Storage::BF16)
    kernels::grouped_gemm_wgrad(M, N, alpha, a, lda, b, ldb, device_ptr<__nv_bfloat16>(C), ldc, sc,
                                offsets, groups, stream_);
  else
    kernels::grouped_gemm_wgrad(M, N, alpha, a, lda, b, ldb, C.as<float>(), ldc, sc, offsets,
                                groups, stream_);
}

// Gram products on mma.sync (kernels/symmetric_gemm.cu): only the upper tiles, mirrored. The
// operands are rounded to bf16 as the kernel loads them (Newton-Schulz's workspaces are fp32), in
// both precision modes.
void CudaBackend::symmetric_gemm_batched(bool trans, int n, int k, float alpha, CDevPtr X, int ldx,
                                         std::size_t sx, float beta, CDevPtr C, int ldc,
                                         std::size_t sc, float shift, DevPtr D, int ldd,
                                         std::size_t sd, int batch) {
  if (n <= 0 || batch <= 0) return;
  if (beta != 0.0f && C.storage() != D.storage())
    throw std::invalid_argument("symmetric_gemm_batched: C and D differ in storage");
  wrote(D.get(), (std::size_t(batch - 1) * sd + std::size_t(n - 1) * ldd + n) * D.element_bytes());
  const auto run = [&](const auto* x, auto* d) {
    using TD = std::remove_pointer_t<decltype(d)>;
    const TD* c = beta != 0.0f ? device_ptr<TD>(C) : nullptr;
    kernels::symmetric_gemm_batched(trans, n, k, alpha, x, ldx, sx, beta, c, ldc, sc, shift, d, ldd,
                                    sd, batch, stream_);
  };
  const auto with_d = [&](const auto* x) {
    if (D.storage() == Storage::BF16)
      run(x, device_ptr<__nv_bfloat16>(D));
    else
      run(x, D.as<float>());
  };
  if (X.storage() == Storage::BF16)
    with_d(device_ptr<__nv_bfloat16>(X));
  else
    with_d(X.as<const float>());
}

void CudaBackend::gemm_impl(bool ta, bool tb, int M, int N, int K, float alpha, CDevPtr A, int lda,
                            std::size_t sa, CDevPtr B, int ldb, std::size_t sb, float beta,
                            DevPtr C, int ldc, std::size_t sc, int batch) {
  if (M <= 0 || N <= 0 || batch <= 0) return;
  const bool c_bf16 = C.storage() == Storage::BF16;
  for (const Storage st : {A.storage(), B.storage(), C.storage()})
    if (st == Storage::F64) throw std::invalid_argument("gemm: the CUDA backend has no f64 GEMM");
  const std::size_t c_span = std::size_t(batch - 1) * sc + std::size_t(M - 1) * ldc + N;
  wrote(C.get(), c_span * C.element_bytes());
  if (K <= 0) {  // an empty sum: C = beta * C, in one launch (none when beta = 1)
    if (batch == 1 || sc == std::size_t(M) * std::size_t(ldc))
      return scale_rows(C, M * batch, N, ldc, beta);
    for (int i = 0; i < batch; ++i) scale_rows(C + std::size_t(i) * sc, M, N, ldc, beta);
    return;
  }
  // bf16 mode multiplies bf16 operands with fp32 accumulation, except a product kept in fp32 that
  // reads weights — the router's logits — which runs in fp32 on the master weights.
  const bool bf16_operands = bf16_ && !(!c_bf16 && (is_weight(A) || is_weight(B)));
  if (c_bf16 && !bf16_operands)
    throw std::invalid_argument("gemm: a bf16 result needs bf16 operands (bf16 mode)");
  ++kernels::host_launch_count();  // the library call
  const void* a = gemm_operand(A, ta, M, K, lda, sa, batch, bf16_operands, gemm_a_);
  const void* b = gemm_operand(B, tb, K, N, ldb, sb, batch, bf16_operands, gemm_b_);
#if defined(MOETRAIN_SIMT)
  // Widen the operands the GPU would read back to fp32 and multiply on the CPU.
  auto widen = [&](const void* x, bool trans, int rows, int cols, int ld, std::size_t stride,
                   Scratch& buf) -> const float* {
    if (!bf16_operands) return static_cast<const float*>(x);
    const int srows = trans ? cols : rows, scols = trans ? rows : cols;
    const std::size_t span = std::size_t(batch - 1) * stride + std::size_t(srows - 1) * ld + scols;
    auto* out = static_cast<float*>(scratch(buf, span * sizeof(float)));
    kernels::convert_from_bf16(out, static_cast<const __nv_bfloat16*>(x), span, stream_);
    return out;
  };
  const float* fa = widen(a, ta, M, K, lda, sa, sim_a_);
  const float* fb = widen(b, tb, K, N, ldb, sb, sim_b_);
  // A bf16 C is widened (exactly) into fp32, multiplied into there and rounded back to nearest:
  // the elements between the rows round-trip unchanged.
  float* fc = nullptr;
  if (c_bf16) {
    fc = static_cast<float*>(scratch(sim_c_, c_span * sizeof(float)));
    kernels::convert_from_bf16(fc, device_ptr<__nv_bfloat16>(CDevPtr(C)), c_span, stream_);
  } else {
    fc = C.as<float>();
  }
  // On the stream, as cuBLASLt runs: after the kernels that wrote the operands, before later ones.
  simt::enqueue_host(stream_, [=] {
    CpuBackend<float> cpu;
    cpu.gemm_batched(ta, tb, M, N, K, alpha, fa, lda, sa, fb, ldb, sb, beta, fc, ldc, sc, batch);
  });
  if (c_bf16)
    kernels::convert_to_bf16(device_ptr<__nv_bfloat16>(C), int(c_span), fc, int(c_span), 1,
                             int(c_span), stream_);
#else
  const GemmPlanKey key{ta,
                        tb,
                        bf16_operands,
                        c_bf16,
                        M,
                        N,
                        K,
                        lda,
                        ldb,
                        ldc,
                        batch,
                        sa,
                        sb,
                        sc,
                        alignment_of(a),
                        alignment_of(b),
                        alignment_of(C.get())};
  std::unique_ptr<GemmPlan>& slot = plans_->plans[key];
  if (!slot) slot = make_plan(static_cast<cublasLtHandle_t>(blas_), blas_workspace_.bytes, key);
  const GemmPlan& plan = *slot;
  check_blas(cublasLtMatmul(static_cast<cublasLtHandle_t>(blas_), plan.desc, &alpha, b, plan.a, a,
                            plan.b, &beta, C.get(), plan.c, C.get(), plan.c, &plan.algo,
                            blas_workspace_.ptr, blas_workspace_.bytes, stream_),
             "matmul");
#endif
}

}  // namespace moetrain
