// The Backend interface: owns device memory and executes ops.
//
// The model, optimizers and trainer call only this interface, so the same training step runs on
// the CPU (CpuBackend, fp32 or double) or the GPU (CudaBackend). All pointers passed to ops are
// device pointers of this backend; activations are row-major with one row per token
// (N = B * T rows, token n = b * T + t).
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

#include "moetrain/config.hpp"

namespace moetrain {

// Shape of one attention call. The fused qkv buffer has rows of width (n_heads + 2 * n_kv_heads)
// * head_dim: all query heads, then all key heads, then all value heads. Query head h uses kv
// head h / (n_heads / n_kv_heads), as HF's repeat_kv does.
struct AttentionShape {
  int batch, seq, n_heads, n_kv_heads, head_dim;
  int qkv_width() const { return (n_heads + 2 * n_kv_heads) * head_dim; }
  int out_width() const { return n_heads * head_dim; }
  int rows() const { return batch * seq; }
};

struct RouterShape {
  int tokens, n_experts, top_k;
  RouterType type;
  double route_scale;
};

template <typename T>
class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;

  // ---- memory -----------------------------------------------------------------------------
  virtual void* alloc_bytes(std::size_t bytes) = 0;  // zero-filled, 64-byte aligned
  virtual void free_bytes(void* p) = 0;
  virtual void upload(void* dst, const void* host_src, std::size_t bytes) = 0;
  virtual void download(void* host_dst, const void* src, std::size_t bytes) = 0;
  virtual void copy(void* dst, const void* src, std::size_t bytes) = 0;
  virtual void zero(void* dst, std::size_t bytes) = 0;
  // Names the buffer of the model's weights, so a mixed-precision backend can keep a
  // low-precision copy of them for its GEMMs (and know when a write makes that copy stale).
  virtual void set_weights(const T* /*weights*/, std::size_t /*count*/) {}

  // ---- dense linear algebra -----------------------------------------------------------------
  // Row-major C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C.
  virtual void gemm(bool trans_a, bool trans_b, int M, int N, int K, T alpha, const T* A, int lda,
                    const T* B, int ldb, T beta, T* C, int ldc) = 0;

  // C_i = alpha * op(A_i) op(B_i) + beta * C_i for i < batch, X_i = X + i * stride_x.
  virtual void gemm_batched(bool trans_a, bool trans_b, int M, int N, int K, T alpha, const T* A,
                            int lda, std::size_t stride_a, const T* B, int ldb,
                            std::size_t stride_b, T beta, T* C, int ldc, std::size_t stride_c,
                            int batch) = 0;

  // ---- elementwise --------------------------------------------------------------------------
  virtual void add(T* out, const T* a, const T* b, std::size_t n) = 0;  // out = a + b
  virtual void add_inplace(T* x, const T* y, std::size_t n) = 0;        // x += y

  // ---- reductions and optimizer steps (fp32 or wider accumulation, deterministic) -----------
  virtual double sum_squares(const T* x, std::size_t n) = 0;
  virtual void scale(T* x, std::size_t n, double s) = 0;
  // y = a * x + b * y
  virtual void axpby(T* y, const T* x, std::size_t n, double a, double b) = 0;
  // out_i = in_i^T for `batch` row-major [rows, cols] matrices.
  virtual void transpose_batched(T* out, const T* in, int batch, int rows, int cols) = 0;
  // X_i /= (||X_i||_F + eps) for `batch` contiguous matrices of `elems` elements.
  virtual void frobenius_normalize(T* x, int batch, std::size_t elems, double eps) = 0;
  // AdamW (bias-corrected, decoupled decay). Returns sum of (m_hat / (sqrt(v_hat) + eps))^2.
  virtual double adamw_update(T* p, const T* g, T* m, T* v, std::size_t n, double lr, double beta1,
                              double beta2, double eps, double weight_decay, std::int64_t t) = 0;
  // M = mu * M + G; U = G + mu * M (Nesterov) or M.
  virtual void muon_momentum(T* M, T* U, const T* G, std::size_t n, double mu, bool nesterov) = 0;
  // W -= lr * (s * O + wd * W). Returns sum of (s * O)^2.
  virtual double muon_update(T* W, const T* O, std::size_t n, double lr, double s,
                             double weight_decay) = 0;

  // ---- embedding ----------------------------------------------------------------------------
  virtual void embedding_forward(T* out, const int32_t* tokens, const T* table, int n, int d) = 0;
  // dtable[tokens[i]] += dout[i]; deterministic (no float atomics).
  virtual void embedding_backward(T* dtable, const T* dout, const int32_t* tokens, int n,
                                  int d) = 0;

  // ---- RMSNorm (fp32 or wider statistics) ---------------------------------------------------
  virtual void rmsnorm_forward(T* out, T* rstd, const T* x, const T* gain, int n, int d,
                               double eps) = 0;
  // dx += ..., dgain += ...
  virtual void rmsnorm_backward(T* dx, T* dgain, const T* dout, const T* x, const T* gain,
                                const T* rstd, int n, int d) = 0;

  // ---- RoPE (half-split convention), in place on n_heads heads of each row ------------------
  // Row r is at position r % seq; cos/sin tables are [seq, head_dim/2].
  virtual void rope_forward(T* x, int ld, int rows, int seq, int n_heads, int head_dim,
                            const T* cos, const T* sin) = 0;
  virtual void rope_backward(T* dx, int ld, int rows, int seq, int n_heads, int head_dim,
                             const T* cos, const T* sin) = 0;

  // ---- causal attention ---------------------------------------------------------------------
  // Elements of `saved` the backend keeps between forward and backward.
  virtual std::size_t attention_saved_elems(const AttentionShape& s) const = 0;
  // out[rows, n_heads*head_dim]; smax[h] = max over the batch, i, j<=i of q_i.k_j / sqrt(hd).
  virtual void attention_forward(T* out, T* saved, T* smax, const T* qkv,
                                 const AttentionShape& s) = 0;
  // Writes (overwrites) dqkv.
  virtual void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* saved,
                                  const AttentionShape& s) = 0;

  // ---- SwiGLU on a fused [rows, 2*ff] input (w1 x | w3 x) -----------------------------------
  virtual void swiglu_forward(T* out, const T* h, int rows, int ff) = 0;
  virtual void swiglu_backward(T* dh, const T* dout, const T* h, int rows, int ff) = 0;

  // ---- softmax cross-entropy ----------------------------------------------------------------
  // losses[i] = logsumexp(logits_i) - logits_i[target_i] (0 for a negative target: padding).
  // When `grad_scale` != 0 the logits are overwritten by d(grad_scale * sum_i losses[i]) / dlogits.
  virtual void cross_entropy(T* losses, T* logits, const int32_t* targets, int n, int vocab,
                             T grad_scale) = 0;

  // ---- MoE router ---------------------------------------------------------------------------
  // From router logits [tokens, E]: scores [tokens, E] (softmax probabilities or sigmoid scores),
  // top-k expert ids (by score, or score + bias for sigmoid_bias; ties toward the lower index),
  // gate weights [tokens, k], counts[E] (assignments per expert), and
  // stats = {L_aux, L_z, mean router entropy}.
  virtual void router_forward(T* scores, int32_t* topk, T* gates, int32_t* counts, T* stats,
                              const T* logits, const T* bias, const RouterShape& s) = 0;
  // dlogits = d(objective)/dlogits from the gate-weight gradients `dgates` (which already carry
  // the caller's grad_scale, coming from the loss) plus grad_scale * (aux_coef * dL_aux +
  // z_coef * dL_z).
  virtual void router_backward(T* dlogits, const T* dgates, const T* logits, const T* scores,
                               const int32_t* topk, const T* gates, const int32_t* counts,
                               const RouterShape& s, double aux_coef, double z_coef,
                               double grad_scale) = 0;

  // ---- MoE token permutation ----------------------------------------------------------------
  // Groups the tokens*k assignments by expert (stable in token order): offsets[E+1] (exclusive
  // scan of counts), pos[t*k+j] = row of assignment (t, j) in the grouped buffer, and
  // xg[row] = x[t].
  virtual void moe_permute(T* xg, int32_t* pos, int32_t* offsets, const T* x, const int32_t* topk,
                           const int32_t* counts, int tokens, int d, int n_experts, int k) = 0;
  // dx[t] += sum_j dxg[pos[t*k+j]]
  virtual void moe_permute_backward(T* dx, const T* dxg, const int32_t* pos, int tokens, int d,
                                    int k) = 0;
  // y[t] = sum_j gates[t,j] * yg[pos[t*k+j]]
  virtual void moe_unpermute(T* y, const T* yg, const T* gates, const int32_t* pos, int tokens,
                             int d, int k) = 0;
  // dyg[pos[t*k+j]] = gates[t,j] * dy[t];  dgates[t,j] = dy[t] . yg[pos[t*k+j]]
  virtual void moe_unpermute_backward(T* dyg, T* dgates, const T* dy, const T* yg, const T* gates,
                                      const int32_t* pos, int tokens, int d, int k) = 0;
};

// An owning device allocation of `count` elements of U.
template <typename T, typename U>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Backend<T>& be, std::size_t count)
      : be_(&be), count_(count), ptr_(static_cast<U*>(be.alloc_bytes(count * sizeof(U)))) {}
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    release();
    be_ = o.be_;
    count_ = o.count_;
    ptr_ = o.ptr_;
    o.ptr_ = nullptr;
    o.count_ = 0;
    return *this;
  }
  ~DeviceBuffer() { release(); }

  U* get() const { return ptr_; }
  std::size_t size() const { return count_; }

 private:
  void release() {
    if (ptr_) be_->free_bytes(ptr_);
    ptr_ = nullptr;
  }
  Backend<T>* be_ = nullptr;
  std::size_t count_ = 0;
  U* ptr_ = nullptr;
};

}  // namespace moetrain
