#include "moetrain/profiling_backend.hpp"

namespace moetrain {

template <typename T>
const char* ProfilingBackend<T>::name() const {
  return inner_.name();
}

template <typename T>
void* ProfilingBackend<T>::alloc_bytes(std::size_t bytes) {
  return inner_.alloc_bytes(bytes);
}

template <typename T>
void ProfilingBackend<T>::free_bytes(void* p) {
  inner_.free_bytes(p);
}

template <typename T>
void ProfilingBackend<T>::upload(void* dst, const void* host_src, std::size_t bytes) {
  inner_.upload(dst, host_src, bytes);
}

template <typename T>
void ProfilingBackend<T>::download(void* host_dst, const void* src, std::size_t bytes) {
  inner_.download(host_dst, src, bytes);
}

template <typename T>
void ProfilingBackend<T>::copy(void* dst, const void* src, std::size_t bytes) {
  inner_.copy(dst, src, bytes);
}

template <typename T>
void ProfilingBackend<T>::zero(void* dst, std::size_t bytes) {
  inner_.zero(dst, bytes);
}

template <typename T>
void ProfilingBackend<T>::gemm(bool trans_a, bool trans_b, int M, int N, int K, T alpha, const T* A,
                               int lda, const T* B, int ldb, T beta, T* C, int ldc) {
  Timer t(*this, "gemm", 2.0 * M * N * K);
  inner_.gemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

template <typename T>
void ProfilingBackend<T>::gemm_batched(bool ta, bool tb, int M, int N, int K, T alpha, const T* A,
                                       int lda, std::size_t sa, const T* B, int ldb, std::size_t sb,
                                       T beta, T* C, int ldc, std::size_t sc, int batch) {
  Timer t(*this, "gemm_batched", 2.0 * M * N * K * batch);
  inner_.gemm_batched(ta, tb, M, N, K, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, batch);
}
template <typename T>
double ProfilingBackend<T>::sum_squares(const T* x, std::size_t n) {
  Timer t(*this, "sum_squares");
  return inner_.sum_squares(x, n);
}
template <typename T>
void ProfilingBackend<T>::scale(T* x, std::size_t n, double s) {
  Timer t(*this, "scale");
  inner_.scale(x, n, s);
}
template <typename T>
void ProfilingBackend<T>::axpby(T* y, const T* x, std::size_t n, double a, double b) {
  Timer t(*this, "axpby");
  inner_.axpby(y, x, n, a, b);
}
template <typename T>
void ProfilingBackend<T>::transpose_batched(T* out, const T* in, int batch, int rows, int cols) {
  Timer t(*this, "transpose_batched");
  inner_.transpose_batched(out, in, batch, rows, cols);
}
template <typename T>
void ProfilingBackend<T>::frobenius_normalize(T* x, int batch, std::size_t elems, double eps) {
  Timer t(*this, "frobenius_normalize");
  inner_.frobenius_normalize(x, batch, elems, eps);
}
template <typename T>
double ProfilingBackend<T>::adamw_update(T* p, const T* g, T* m, T* v, std::size_t n, double lr,
                                         double beta1, double beta2, double eps,
                                         double weight_decay, std::int64_t t) {
  Timer timer(*this, "adamw_update");
  return inner_.adamw_update(p, g, m, v, n, lr, beta1, beta2, eps, weight_decay, t);
}
template <typename T>
void ProfilingBackend<T>::muon_momentum(T* M, T* U, const T* G, std::size_t n, double mu,
                                        bool nesterov) {
  Timer t(*this, "muon_momentum");
  inner_.muon_momentum(M, U, G, n, mu, nesterov);
}
template <typename T>
double ProfilingBackend<T>::muon_update(T* W, const T* O, std::size_t n, double lr, double s,
                                        double weight_decay) {
  Timer t(*this, "muon_update");
  return inner_.muon_update(W, O, n, lr, s, weight_decay);
}
template <typename T>
void ProfilingBackend<T>::add(T* out, const T* a, const T* b, std::size_t n) {
  Timer t(*this, "add");
  inner_.add(out, a, b, n);
}

template <typename T>
void ProfilingBackend<T>::add_inplace(T* x, const T* y, std::size_t n) {
  Timer t(*this, "add_inplace");
  inner_.add_inplace(x, y, n);
}

template <typename T>
void ProfilingBackend<T>::embedding_forward(T* out, const int32_t* tokens, const T* table, int n,
                                            int d) {
  Timer t(*this, "embedding_forward");
  inner_.embedding_forward(out, tokens, table, n, d);
}

template <typename T>
void ProfilingBackend<T>::embedding_backward(T* dtable, const T* dout, const int32_t* tokens, int n,
                                             int d) {
  Timer t(*this, "embedding_backward");
  inner_.embedding_backward(dtable, dout, tokens, n, d);
}

template <typename T>
void ProfilingBackend<T>::rmsnorm_forward(T* out, T* rstd, const T* x, const T* gain, int n, int d,
                                          double eps) {
  Timer t(*this, "rmsnorm_forward");
  inner_.rmsnorm_forward(out, rstd, x, gain, n, d, eps);
}

template <typename T>
void ProfilingBackend<T>::rmsnorm_backward(T* dx, T* dgain, const T* dout, const T* x,
                                           const T* gain, const T* rstd, int n, int d) {
  Timer t(*this, "rmsnorm_backward");
  inner_.rmsnorm_backward(dx, dgain, dout, x, gain, rstd, n, d);
}

template <typename T>
void ProfilingBackend<T>::rope_forward(T* x, int ld, int rows, int seq, int n_heads, int head_dim,
                                       const T* cos, const T* sin) {
  Timer t(*this, "rope_forward");
  inner_.rope_forward(x, ld, rows, seq, n_heads, head_dim, cos, sin);
}

template <typename T>
void ProfilingBackend<T>::rope_backward(T* dx, int ld, int rows, int seq, int n_heads, int head_dim,
                                        const T* cos, const T* sin) {
  Timer t(*this, "rope_backward");
  inner_.rope_backward(dx, ld, rows, seq, n_heads, head_dim, cos, sin);
}

template <typename T>
std::size_t ProfilingBackend<T>::attention_saved_elems(const AttentionShape& s) const {
  return inner_.attention_saved_elems(s);
}

template <typename T>
void ProfilingBackend<T>::attention_forward(T* out, T* saved, T* smax, const T* qkv,
                                            const AttentionShape& s) {
  Timer t(*this, "attention_forward");
  inner_.attention_forward(out, saved, smax, qkv, s);
}

template <typename T>
void ProfilingBackend<T>::attention_backward(T* dqkv, const T* dout, const T* qkv, const T* saved,
                                             const AttentionShape& s) {
  Timer t(*this, "attention_backward");
  inner_.attention_backward(dqkv, dout, qkv, saved, s);
}

template <typename T>
void ProfilingBackend<T>::swiglu_forward(T* out, const T* h, int rows, int ff) {
  Timer t(*this, "swiglu_forward");
  inner_.swiglu_forward(out, h, rows, ff);
}

template <typename T>
void ProfilingBackend<T>::swiglu_backward(T* dh, const T* dout, const T* h, int rows, int ff) {
  Timer t(*this, "swiglu_backward");
  inner_.swiglu_backward(dh, dout, h, rows, ff);
}

template <typename T>
void ProfilingBackend<T>::cross_entropy(T* losses, T* logits, const int32_t* targets, int n,
                                        int vocab, T grad_scale) {
  Timer t(*this, "cross_entropy");
  inner_.cross_entropy(losses, logits, targets, n, vocab, grad_scale);
}

template <typename T>
void ProfilingBackend<T>::router_forward(T* scores, int32_t* topk, T* gates, int32_t* counts,
                                         T* stats, const T* logits, const T* bias,
                                         const RouterShape& s) {
  Timer t(*this, "router_forward");
  inner_.router_forward(scores, topk, gates, counts, stats, logits, bias, s);
}

template <typename T>
void ProfilingBackend<T>::router_backward(T* dlogits, const T* dgates, const T* logits,
                                          const T* scores, const int32_t* topk, const T* gates,
                                          const int32_t* counts, const RouterShape& s,
                                          double aux_coef, double z_coef, double grad_scale) {
  Timer t(*this, "router_backward");
  inner_.router_backward(dlogits, dgates, logits, scores, topk, gates, counts, s, aux_coef, z_coef,
                         grad_scale);
}

template <typename T>
void ProfilingBackend<T>::moe_permute(T* xg, int32_t* pos, int32_t* offsets, const T* x,
                                      const int32_t* topk, const int32_t* counts, int tokens, int d,
                                      int n_experts, int k) {
  Timer t(*this, "moe_permute");
  inner_.moe_permute(xg, pos, offsets, x, topk, counts, tokens, d, n_experts, k);
}

template <typename T>
void ProfilingBackend<T>::moe_permute_backward(T* dx, const T* dxg, const int32_t* pos, int tokens,
                                               int d, int k) {
  Timer t(*this, "moe_permute_backward");
  inner_.moe_permute_backward(dx, dxg, pos, tokens, d, k);
}

template <typename T>
void ProfilingBackend<T>::moe_unpermute(T* y, const T* yg, const T* gates, const int32_t* pos,
                                        int tokens, int d, int k) {
  Timer t(*this, "moe_unpermute");
  inner_.moe_unpermute(y, yg, gates, pos, tokens, d, k);
}

template <typename T>
void ProfilingBackend<T>::moe_unpermute_backward(T* dyg, T* dgates, const T* dy, const T* yg,
                                                 const T* gates, const int32_t* pos, int tokens,
                                                 int d, int k) {
  Timer t(*this, "moe_unpermute_backward");
  inner_.moe_unpermute_backward(dyg, dgates, dy, yg, gates, pos, tokens, d, k);
}

template class ProfilingBackend<float>;
template class ProfilingBackend<double>;

}  // namespace moetrain
