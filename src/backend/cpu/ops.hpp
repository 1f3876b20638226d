// The CPU backend's op implementations, one file per op family (forward and backward side by
// side), as free function templates instantiated for float and double. CpuBackend forwards to
// these; see include/moetrain/backend.hpp for the contract of each op.
#pragma once

#include <cstddef>
#include <cstdint>

#include "moetrain/backend.hpp"

namespace moetrain::cpu {

// While alive, OpenBLAS runs each call on the calling thread. Needed around OpenMP regions that
// call gemm from several threads: OpenBLAS's own threading inside them is many times slower.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas();
  ~SingleThreadedBlas();
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int saved_;
};

template <typename T>
void gemm(bool trans_a, bool trans_b, int M, int N, int K, T alpha, const T* A, int lda, const T* B,
          int ldb, T beta, T* C, int ldc);

template <typename T>
void gemm_batched(bool trans_a, bool trans_b, int M, int N, int K, T alpha, const T* A, int lda,
                  std::size_t stride_a, const T* B, int ldb, std::size_t stride_b, T beta, T* C,
                  int ldc, std::size_t stride_c, int batch);

template <typename T>
double sum_squares(const T* x, std::size_t n);
template <typename T>
void scale(T* x, std::size_t n, double s);
template <typename T>
void axpby(T* y, const T* x, std::size_t n, double a, double b);
template <typename T>
void transpose_batched(T* out, const T* in, int batch, int rows, int cols);
template <typename T>
void frobenius_normalize(T* x, int batch, std::size_t elems, double eps);
template <typename T>
double adamw_update(T* p, const T* g, T* m, T* v, std::size_t n, double lr, double beta1,
                    double beta2, double eps, double weight_decay, std::int64_t t);
template <typename T>
void muon_momentum(T* M, T* U, const T* G, std::size_t n, double mu, bool nesterov);
template <typename T>
double muon_update(T* W, const T* O, std::size_t n, double lr, double s, double weight_decay);

template <typename T>
void add(T* out, const T* a, const T* b, std::size_t n);
template <typename T>
void add_inplace(T* x, const T* y, std::size_t n);

template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* table, int n, int d);
template <typename T>
void embedding_backward(T* dtable, const T* dout, const int32_t* tokens, int n, int d);

template <typename T>
void rmsnorm_forward(T* out, T* rstd, const T* x, const T* gain, int n, int d, double eps);
template <typename T>
void rmsnorm_backward(T* dx, T* dgain, const T* dout, const T* x, const T* gain, const T* rstd,
                      int n, int d);

template <typename T>
void rope_forward(T* x, int ld, int rows, int seq, int n_heads, int head_dim, const T* cos,
                  const T* sin);
template <typename T>
void rope_backward(T* dx, int ld, int rows, int seq, int n_heads, int head_dim, const T* cos,
                   const T* sin);

std::size_t attention_saved_elems(const AttentionShape& s);
template <typename T>
void attention_forward(T* out, T* probs, T* smax, const T* qkv, const AttentionShape& s);
template <typename T>
void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* probs,
                        const AttentionShape& s);

template <typename T>
void swiglu_forward(T* out, const T* h, int rows, int ff);
template <typename T>
void swiglu_backward(T* dh, const T* dout, const T* h, int rows, int ff);

template <typename T>
void cross_entropy(T* losses, T* logits, const int32_t* targets, int n, int vocab, T grad_scale);

template <typename T>
void router_forward(T* scores, int32_t* topk, T* gates, int32_t* counts, T* stats, const T* logits,
                    const T* bias, const RouterShape& s);
template <typename T>
void router_backward(T* dlogits, const T* dgates, const T* logits, const T* scores,
                     const int32_t* topk, const T* gates, const int32_t* counts,
                     const RouterShape& s, double aux_coef, double z_coef, double grad_scale);

template <typename T>
void moe_permute(T* xg, int32_t* pos, int32_t* offsets, const T* x, const int32_t* topk,
                 const int32_t* counts, int tokens, int d, int n_experts, int k);
template <typename T>
void moe_permute_backward(T* dx, const T* dxg, const int32_t* pos, int tokens, int d, int k);
template <typename T>
void moe_unpermute(T* y, const T* yg, const T* gates, const int32_t* pos, int tokens, int d, int k);
template <typename T>
void moe_unpermute_backward(T* dyg, T* dgates, const T* dy, const T* yg, const T* gates,
                            const int32_t* pos, int tokens, int d, int k);

}  // namespace moetrain::cpu
