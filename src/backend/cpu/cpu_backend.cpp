#include "moetrain/cpu_backend.hpp"

#include <cstdlib>
#include <cstring>
#include <new>

#include "backend/cpu/ops.hpp"

namespace moetrain {

template <typename T>
const char* CpuBackend<T>::name() const {
  return sizeof(T) == 8 ? "cpu-fp64" : "cpu-fp32";
}

template <typename T>
void* CpuBackend<T>::alloc_bytes(std::size_t bytes) {
  const std::size_t rounded = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded ? rounded : 64);
  if (!p) throw std::bad_alloc();
  std::memset(p, 0, rounded ? rounded : 64);
  return p;
}
template <typename T>
void CpuBackend<T>::free_bytes(void* p) {
  std::free(p);
}
template <typename T>
void CpuBackend<T>::upload(void* dst, const void* src, std::size_t bytes) {
  if (bytes) std::memcpy(dst, src, bytes);
}
template <typename T>
void CpuBackend<T>::download(void* dst, const void* src, std::size_t bytes) {
  if (bytes) std::memcpy(dst, src, bytes);
}
template <typename T>
void CpuBackend<T>::copy(void* dst, const void* src, std::size_t bytes) {
  if (bytes) std::memmove(dst, src, bytes);
}
template <typename T>
void CpuBackend<T>::zero(void* dst, std::size_t bytes) {
  if (bytes) std::memset(dst, 0, bytes);
}

template <typename T>
void CpuBackend<T>::gemm(bool ta, bool tb, int M, int N, int K, T alpha, const T* A, int lda,
                         const T* B, int ldb, T beta, T* C, int ldc) {
  cpu::gemm<T>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
template <typename T>
void CpuBackend<T>::gemm_batched(bool ta, bool tb, int M, int N, int K, T alpha, const T* A,
                                 int lda, std::size_t sa, const T* B, int ldb, std::size_t sb,
                                 T beta, T* C, int ldc, std::size_t sc, int batch) {
  cpu::gemm_batched<T>(ta, tb, M, N, K, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, batch);
}
template <typename T>
double CpuBackend<T>::sum_squares(const T* x, std::size_t n) {
  return cpu::sum_squares(x, n);
}
template <typename T>
void CpuBackend<T>::scale(T* x, std::size_t n, double s) {
  cpu::scale(x, n, s);
}
template <typename T>
void CpuBackend<T>::axpby(T* y, const T* x, std::size_t n, double a, double b) {
  cpu::axpby(y, x, n, a, b);
}
template <typename T>
void CpuBackend<T>::transpose_batched(T* out, const T* in, int batch, int rows, int cols) {
  cpu::transpose_batched(out, in, batch, rows, cols);
}
template <typename T>
void CpuBackend<T>::frobenius_normalize(T* x, int batch, std::size_t elems, double eps) {
  cpu::frobenius_normalize(x, batch, elems, eps);
}
template <typename T>
double CpuBackend<T>::adamw_update(T* p, const T* g, T* m, T* v, std::size_t n, double lr,
                                   double beta1, double beta2, double eps, double weight_decay,
                                   std::int64_t t) {
  return cpu::adamw_update(p, g, m, v, n, lr, beta1, beta2, eps, weight_decay, t);
}
template <typename T>
void CpuBackend<T>::muon_momentum(T* M, T* U, const T* G, std::size_t n, double mu, bool nesterov) {
  cpu::muon_momentum(M, U, G, n, mu, nesterov);
}
template <typename T>
double CpuBackend<T>::muon_update(T* W, const T* O, std::size_t n, double lr, double s,
                                  double weight_decay) {
  return cpu::muon_update(W, O, n, lr, s, weight_decay);
}
template <typename T>
void CpuBackend<T>::add(T* out, const T* a, const T* b, std::size_t n) {
  cpu::add(out, a, b, n);
}
template <typename T>
void CpuBackend<T>::add_inplace(T* x, const T* y, std::size_t n) {
  cpu::add_inplace(x, y, n);
}
template <typename T>
void CpuBackend<T>::embedding_forward(T* out, const int32_t* tokens, const T* table, int n, int d) {
  cpu::embedding_forward(out, tokens, table, n, d);
}
template <typename T>
void CpuBackend<T>::embedding_backward(T* dtable, const T* dout, const int32_t* tokens, int n,
                                       int d) {
  cpu::embedding_backward(dtable, dout, tokens, n, d);
}
template <typename T>
void CpuBackend<T>::rmsnorm_forward(T* out, T* rstd, const T* x, const T* gain, int n, int d,
                                    double eps) {
  cpu::rmsnorm_forward(out, rstd, x, gain, n, d, eps);
}
template <typename T>
void CpuBackend<T>::rmsnorm_backward(T* dx, T* dgain, const T* dout, const T* x, const T* gain,
                                     const T* rstd, int n, int d) {
  cpu::rmsnorm_backward(dx, dgain, dout, x, gain, rstd, n, d);
}
template <typename T>
void CpuBackend<T>::rope_forward(T* x, int ld, int rows, int seq, int n_heads, int head_dim,
                                 const T* cos, const T* sin) {
  cpu::rope_forward(x, ld, rows, seq, n_heads, head_dim, cos, sin);
}
template <typename T>
void CpuBackend<T>::rope_backward(T* dx, int ld, int rows, int seq, int n_heads, int head_dim,
                                  const T* cos, const T* sin) {
  cpu::rope_backward(dx, ld, rows, seq, n_heads, head_dim, cos, sin);
}
template <typename T>
std::size_t CpuBackend<T>::attention_saved_elems(const AttentionShape& s) const {
  return cpu::attention_saved_elems(s);
}
template <typename T>
void CpuBackend<T>::attention_forward(T* out, T* saved, T* smax, const T* qkv,
                                      const AttentionShape& s) {
  cpu::attention_forward(out, saved, smax, qkv, s);
}
template <typename T>
void CpuBackend<T>::attention_backward(T* dqkv, const T* dout, const T* qkv, const T* saved,
                                       const AttentionShape& s) {
  cpu::attention_backward(dqkv, dout, qkv, saved, s);
}
template <typename T>
void CpuBackend<T>::swiglu_forward(T* out, const T* h, int rows, int ff) {
  cpu::swiglu_forward(out, h, rows, ff);
}
template <typename T>
void CpuBackend<T>::swiglu_backward(T* dh, const T* dout, const T* h, int rows, int ff) {
  cpu::swiglu_backward(dh, dout, h, rows, ff);
}
template <typename T>
void CpuBackend<T>::cross_entropy(T* losses, T* logits, const int32_t* targets, int n, int vocab,
                                  T grad_scale) {
  cpu::cross_entropy(losses, logits, targets, n, vocab, grad_scale);
}
template <typename T>
void CpuBackend<T>::router_forward(T* scores, int32_t* topk, T* gates, int32_t* counts, T* stats,
                                   const T* logits, const T* bias, const RouterShape& s) {
  cpu::router_forward(scores, topk, gates, counts, stats, logits, bias, s);
}
template <typename T>
void CpuBackend<T>::router_backward(T* dlogits, const T* dgates, const T* logits, const T* scores,
                                    const int32_t* topk, const T* gates, const int32_t* counts,
                                    const RouterShape& s, double aux_coef, double z_coef,
                                    double grad_scale) {
  cpu::router_backward(dlogits, dgates, logits, scores, topk, gates, counts, s, aux_coef, z_coef,
                       grad_scale);
}
template <typename T>
void CpuBackend<T>::moe_permute(T* xg, int32_t* pos, int32_t* offsets, const T* x,
                                const int32_t* topk, const int32_t* counts, int tokens, int d,
                                int n_experts, int k) {
  cpu::moe_permute(xg, pos, offsets, x, topk, counts, tokens, d, n_experts, k);
}
template <typename T>
void CpuBackend<T>::moe_permute_backward(T* dx, const T* dxg, const int32_t* pos, int tokens, int d,
                                         int k) {
  cpu::moe_permute_backward(dx, dxg, pos, tokens, d, k);
}
template <typename T>
void CpuBackend<T>::moe_unpermute(T* y, const T* yg, const T* gates, const int32_t* pos, int tokens,
                                  int d, int k) {
  cpu::moe_unpermute(y, yg, gates, pos, tokens, d, k);
}
template <typename T>
void CpuBackend<T>::moe_unpermute_backward(T* dyg, T* dgates, const T* dy, const T* yg,
                                           const T* gates, const int32_t* pos, int tokens, int d,
                                           int k) {
  cpu::moe_unpermute_backward(dyg, dgates, dy, yg, gates, pos, tokens, d, k);
}

template class CpuBackend<float>;
template class CpuBackend<double>;

}  // namespace moetrain
