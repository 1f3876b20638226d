// ProfilingBackend: wraps another backend and accounts wall time (and GEMM FLOPs) per op, for
// `moetrain bench --profile`. Memory calls pass through untimed. On an asynchronous backend the
// times are launch times unless the inner backend synchronises.
#pragma once

#include <chrono>
#include <map>
#include <string>

#include "moetrain/backend.hpp"

namespace moetrain {

struct OpProfile {
  double seconds = 0;
  double flops = 0;
  long calls = 0;
};

template <typename T>
class ProfilingBackend final : public Backend<T> {
 public:
  explicit ProfilingBackend(Backend<T>& inner) : inner_(inner) {}

  const std::map<std::string, OpProfile>& profile() const { return profile_; }
  void reset() { profile_.clear(); }

  const char* name() const override;
  void* alloc_bytes(std::size_t bytes) override;
  void free_bytes(void* p) override;
  void upload(void* dst, const void* host_src, std::size_t bytes) override;
  void download(void* host_dst, const void* src, std::size_t bytes) override;
  void copy(void* dst, const void* src, std::size_t bytes) override;
  void zero(void* dst, std::size_t bytes) override;
  void set_weights(const T* weights, std::size_t count) override {
    inner_.set_weights(weights, count);
  }
  void gemm(bool trans_a, bool trans_b, int M, int N, int K, T alpha, const T* A, int lda,
            const T* B, int ldb, T beta, T* C, int ldc) override;
  void gemm_batched(bool trans_a, bool trans_b, int M, int N, int K, T alpha, const T* A, int lda,
                    std::size_t stride_a, const T* B, int ldb, std::size_t stride_b, T beta, T* C,
                    int ldc, std::size_t stride_c, int batch) override;
  double sum_squares(const T* x, std::size_t n) override;
  void scale(T* x, std::size_t n, double s) override;
  void axpby(T* y, const T* x, std::size_t n, double a, double b) override;
  void transpose_batched(T* out, const T* in, int batch, int rows, int cols) override;
  void frobenius_normalize(T* x, int batch, std::size_t elems, double eps) override;
  double adamw_update(T* p, const T* g, T* m, T* v, std::size_t n, double lr, double beta1,
                      double beta2, double eps, double weight_decay, std::int64_t t) override;
  void muon_momentum(T* M, T* U, const T* G, std::size_t n, double mu, bool nesterov) override;
  double muon_update(T* W, const T* O, std::size_t n, double lr, double s,
                     double weight_decay) override;
  void add(T* out, const T* a, const T* b, std::size_t n) override;
  void add_inplace(T* x, const T* y, std::size_t n) override;
  void embedding_forward(T* out, const int32_t* tokens, const T* table, int n, int d) override;
  void embedding_backward(T* dtable, const T* dout, const int32_t* tokens, int n, int d) override;
  void rmsnorm_forward(T* out, T* rstd, const T* x, const T* gain, int n, int d,
                       double eps) override;
  void rmsnorm_backward(T* dx, T* dgain, const T* dout, const T* x, const T* gain, const T* rstd,
                        int n, int d) override;
  void rope_forward(T* x, int ld, int rows, int seq, int n_heads, int head_dim, const T* cos,
                    const T* sin) override;
  void rope_backward(T* dx, int ld, int rows, int seq, int n_heads, int head_dim, const T* cos,
                     const T* sin) override;
  std::size_t attention_saved_elems(const AttentionShape& s) const override;
  void attention_forward(T* out, T* saved, T* smax, const T* qkv, const AttentionShape& s) override;
  void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* saved,
                          const AttentionShape& s) override;
  void swiglu_forward(T* out, const T* h, int rows, int ff) override;
  void swiglu_backward(T* dh, const T* dout, const T* h, int rows, int ff) override;
  void cross_entropy(T* losses, T* logits, const int32_t* targets, int n, int vocab,
                     T grad_scale) override;
  void router_forward(T* scores, int32_t* topk, T* gates, int32_t* counts, T* stats,
                      const T* logits, const T* bias, const RouterShape& s) override;
  void router_backward(T* dlogits, const T* dgates, const T* logits, const T* scores,
                       const int32_t* topk, const T* gates, const int32_t* counts,
                       const RouterShape& s, double aux_coef, double z_coef,
                       double grad_scale) override;
  void moe_permute(T* xg, int32_t* pos, int32_t* offsets, const T* x, const int32_t* topk,
                   const int32_t* counts, int tokens, int d, int n_experts, int k) override;
  void moe_permute_backward(T* dx, const T* dxg, const int32_t* pos, int tokens, int d,
                            int k) override;
  void moe_unpermute(T* y, const T* yg, const T* gates, const int32_t* pos, int tokens, int d,
                     int k) override;
  void moe_unpermute_backward(T* dyg, T* dgates, const T* dy, const T* yg, const T* gates,
                              const int32_t* pos, int tokens, int d, int k) override;

 private:
  struct Timer {
    Timer(ProfilingBackend& pb, const char* op, double flops = 0)
        : pb_(pb), op_(op), flops_(flops), t0_(std::chrono::steady_clock::now()) {}
    ~Timer() {
      OpProfile& p = pb_.profile_[op_];
      p.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
      p.flops += flops_;
      ++p.calls;
    }
    ProfilingBackend& pb_;
    const char* op_;
    double flops_;
    std::chrono::steady_clock::time_point t0_;
  };

  Backend<T>& inner_;
  std::map<std::string, OpProfile> profile_;
};

extern template class ProfilingBackend<float>;
extern template class ProfilingBackend<double>;

}  // namespace moetrain
