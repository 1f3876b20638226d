// CudaBackend: the Backend on one GPU. Every op is a kernel of kernels/ (or a cuBLASLt GEMM) on the
// backend's own stream; only downloads (and frees) synchronise that stream. The same source builds
// twice: against the CUDA toolkit (nvcc kernels, cuBLASLt) and against the SIMT simulator
// (tests/simt), where GEMMs run on the CPU backend.
//
// Precision (docs/design.md §6.1): master weights, their gradients, optimizer state and statistics
// are fp32. In bf16 mode activations are stored in bf16 and the GEMMs read bf16 operands with fp32
// accumulation; weights come from a bf16 copy of the master weights, rewritten (to nearest, or
// stochastically) whenever the masters change (the backend sees every write into the weight
// buffer); an fp32 product from the weights (the router's logits) reads the fp32 masters.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common.cuh"
#include "moetrain/cuda_backend.hpp"
#include "moetrain/profiling_backend.hpp"

namespace moetrain {

// The element type of a storage on the device: float, or __nv_bfloat16.
template <typename E>
constexpr Storage device_storage() {
  return std::is_same_v<E, float> ? Storage::F32 : Storage::BF16;
}
// A typed pointer as E (const E for a CDevPtr), checked against its storage (the CUDA side of
// DevPtr::as, which knows bf16).
template <typename E, typename V>
auto device_ptr(BasicDevPtr<V> p) {
  using Out = std::conditional_t<std::is_const_v<V>, const E, E>;
  if (p.get() && p.storage() != device_storage<E>())
    throw std::logic_error(std::string("a ") + to_string(p.storage()) + " buffer used as " +
                           to_string(device_storage<E>()));
  return static_cast<Out*>(p.get());
}
// Calls f(E{}) with the element type of the activations `acts` of op `op`: they must share one
// storage, f32 or bf16.
template <typename F>
void with_activation_type(const char* op, std::initializer_list<CDevPtr> acts, F&& f) {
  const Storage s = acts.begin()->storage();
  for (const CDevPtr& p : acts)
    if (p.storage() != s)
      throw std::invalid_argument(std::string(op) + ": activations of storage " + to_string(s) +
                                  " and " + to_string(p.storage()) + " in one call");
  if (s == Storage::F32)
    f(float{});
  else if (s == Storage::BF16)
    f(__nv_bfloat16{});
  else
    throw std::invalid_argument(std::string(op) + ": the CUDA backend has no " + to_string(s) +
                                " activations");
}

class CudaBackend final : public Backend<float>, public DeviceMarkers {
 public:
  explicit CudaBackend(const CudaBackendOptions& options);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  const char* name() const override { return bf16_ ? "cuda-bf16" : "cuda-fp32"; }
  cudaStream_t stream() const { return stream_; }
  void* native_stream() const override { return stream_; }
  void synchronize();

  MOETRAIN_BACKEND_MEMORY(MOETRAIN_OP_OVERRIDE, float)
  MOETRAIN_BACKEND_OPS(MOETRAIN_OP_OVERRIDE, float)
  MOETRAIN_BACKEND_QUERIES(MOETRAIN_QUERY_OVERRIDE, float)

  // CUDA graphs (graphs.cpp): a key's first call runs eagerly, its second captures and launches a
  // graph, later ones replay it.
  void run_repeated(const RepeatKey& key, const std::function<void()>& work) override;
  struct GraphStats {
    std::uint64_t captures = 0, replays = 0;
  };
  GraphStats graph_stats() const { return graph_stats_; }

  // DeviceMarkers (bench): CUDA events on the stream; launches (kernels, cuBLASLt calls, graph
  // launches) and synchronisations so far.
  int mark() override;
  double seconds(int from, int to) override;
  void clear_markers() override { markers_used_ = 0; }
  std::uint64_t host_launches() const override { return kernels::host_launch_count(); }
  std::uint64_t host_syncs() const override { return syncs_; }

  // The bf16 copy of the weights as the GEMMs would read it now (refreshed if stale); null in
  // fp32 mode or before set_weights. For tests.
  const __nv_bfloat16* weight_copy();

 private:
  // A grow-only device buffer: reused by consecutive ops on the one stream.
  struct Scratch {
    void* ptr = nullptr;
    std::size_t bytes = 0;
  };
  void* scratch(Scratch& s, std::size_t bytes);
  // The partials workspace of the reducing kernels (kernels/optimizer.cuh).
  double* reduce_workspace();
  // A grouped GEMM operand as bf16 (see gemm_operand), and C *= beta over rows x N.
  const __nv_bfloat16* bf16_operand(CDevPtr X, int rows, int cols, int ld, std::size_t stride,
                                    int batch, Scratch& buf);
  void scale_rows(DevPtr C, int rows, int N, int ldc, float beta);
  // Throws (naming `what`) while run_repeated captures: the op would not be replayed.
  void refuse_in_capture(const char* what) const;
  // Destroys every recorded graph (device memory they use is being freed or moved).
  void drop_recordings();
  // Marks the bf16 weight copy stale when [dst, dst + bytes) overlaps the weights.
  void wrote(const void* dst, std::size_t bytes);
  // A GEMM operand as the GEMM reads it: bf16 (the data itself, the bf16 weight copy, or fp32
  // data rounded into `buf`) when `bf16_operand`, else fp32 (the data, or bf16 data widened).
  const void* gemm_operand(CDevPtr X, bool trans, int rows, int cols, int ld, std::size_t stride,
                           int batch, bool bf16_operand, Scratch& buf);
  // An attention operand of `elems` elements as bf16: the activation itself, or (fp32 mode) its
  // rounding into `buf`.
  const __nv_bfloat16* attention_input(CDevPtr x, std::size_t elems, Scratch& buf);
  // The cuSOLVER handle on the stream, created at first use; destroyed with the backend.
  void* solver();
  void destroy_solver();
  // Whether X points into the weights named by set_weights.
  bool is_weight(CDevPtr X) const;
  void gemm_impl(bool trans_a, bool trans_b, int M, int N, int K, float alpha, CDevPtr A, int lda,
                 std::size_t stride_a, CDevPtr B, int ldb, std::size_t stride_b, float beta,
                 DevPtr C, int ldc, std::size_t stride_c, int batch);

  bool bf16_;
  bool stochastic_;  // stochastic rounding of the bf16 weight copy (else to nearest)
  std::uint64_t seed_;
  cudaStream_t stream_ = nullptr;
  void* blas_ = nullptr;    // cublasLtHandle_t in the CUDA build (opaque: no cuBLAS in this header)
  void* solver_ = nullptr;  // cusolverDnHandle_t in the CUDA build (linalg.cpp)
  // The dense solvers' matrices (column-major), results, device workspace and infos (linalg.cpp).
  Scratch solver_a_, solver_w_, solver_ws_, solver_info_;
  std::vector<char> solver_host_ws_;
  // cuBLASLt descriptors, layouts and algorithms cached per GEMM shape (gemm.cpp).
  struct GemmPlans;
  std::unique_ptr<GemmPlans> plans_;
  Scratch blas_workspace_, op_scratch_, gemm_a_, gemm_b_;
  Scratch sim_a_, sim_b_, sim_c_;  // simulator build: the widened GEMM operands and bf16 result
  // fp32 mode: bf16 copies of attention's inputs and outputs for the flash kernels.
  Scratch attention_qkv_, attention_out_, attention_dout_, attention_dqkv_;
  // Pinned staging of uploads (see upload()); bytes used since the last synchronize().
  static constexpr std::size_t kStagingBytes = std::size_t(8) << 20;
  void* staging_ = nullptr;
  std::size_t staging_used_ = 0;

  const float* weights_ = nullptr;
  std::size_t weight_count_ = 0;
  __nv_bfloat16* weight_copy_ = nullptr;
  bool weight_copy_stale_ = true;
  std::uint64_t weight_copy_version_ = 0;

  struct Recording {  // one run_repeated key: its calls so far and its graph once captured
    RepeatKey key;
    int calls = 0;
    cudaGraphExec_t exec = nullptr;
  };
  bool graphs_;
  bool capturing_ = false;
  std::vector<Recording> recordings_;
  GraphStats graph_stats_;

  std::vector<cudaEvent_t> markers_;  // a pool: the first markers_used_ are recorded
  std::size_t markers_used_ = 0;
  std::uint64_t syncs_ = 0;
};

}  // namespace moetrain
