// The list of Backend ops: the one place each op's signature is written (docs/design.md §10 says
// how to add one). Everything that declares, implements or wraps the ops expands these lists:
// the Backend interface (backend.hpp), CpuBackend and its free functions (src/backend/cpu/),
// CudaBackend's declarations (src/backend/cuda/) and the ProfilingBackend wrapper.
//
// Each list is a macro of (X, T, AP, CAP): X(ret, name, params, args, flops) per op, with T the
// master type (a template parameter, or `float` for the CUDA backend): plain T* buffers hold
// parameters, gradients, optimizer state and statistics (RMSNorm's rstd, attention's saved softmax
// state, router logits, scores and gates, losses, S_max). Activations and GEMM operands are typed
// device pointers, AP and CAP (DevPtr / CDevPtr, dev_ptr.hpp, in the interface; T* / const T* in
// the CPU backend's implementations), whose storage is the backend's activation_storage() (or T,
// for a GEMM on parameters, gradients or optimizer workspaces). `args` forwards `params`; `flops`
// is the op's FLOP count for the profiler (0 when it is not a matmul). The ops are grouped by
// family: the CPU backend implements each family in the file named after it
// (src/backend/cpu/<family>.cpp) and kernels/<family>.cu holds its kernels.
//
// All pointers are device buffers of the backend. Activations are row-major with one row per token
// (N = B * T rows, token n = b * T + t).
#pragma once

#include <cstddef>
#include <cstdint>

#include "moetrain/dev_ptr.hpp"
#include "moetrain/op_shapes.hpp"

// clang-format off

// Memory (not timed by the profiler). alloc_bytes: zero-filled, 64-byte aligned. set_weights names
// the buffer of the model's weights, so a mixed-precision backend can keep a low-precision copy of
// them for its GEMMs (and know when a write makes that copy stale).
#define MOETRAIN_BACKEND_MEMORY(X, T)                                                              \
  X(void*, alloc_bytes, (std::size_t bytes), (bytes), 0)                                           \
  X(void, free_bytes, (void* p), (p), 0)                                                           \
  X(void, upload, (void* dst, const void* host_src, std::size_t bytes), (dst, host_src, bytes), 0) \
  X(void, download, (void* host_dst, const void* src, std::size_t bytes), (host_dst, src, bytes), 0) \
  X(void, copy, (void* dst, const void* src, std::size_t bytes), (dst, src, bytes), 0)             \
  X(void, zero, (void* dst, std::size_t bytes), (dst, bytes), 0)                                   \
  X(void, set_weights, (const T* weights, std::size_t count), (weights, count), 0)

// gemm: row-major C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C.
// gemm_batched: the same for i < batch with X_i = X + i * stride_x.
// grouped_gemm: one product per group g < groups over the rows [offsets[g], offsets[g+1]) of A and
//   C (offsets: a device array of groups + 1 row offsets, offsets[groups] == rows):
//   C[r, :N] = alpha * A[r, :K] * op(B_g) + beta * C[r, :N], B_g = B + g * stride_b, op(B_g) [K, N]
//   (trans_b: B_g is stored [N, K]). All experts of an MoE layer in one call; an empty group costs
//   nothing.
// grouped_gemm_wgrad: the weight gradients of grouped_gemm, accumulated:
//   C_g[M, N] += alpha * A[rows_g, :M]^T * B[rows_g, :N], C_g = C + g * stride_c.
// symmetric_gemm_batched: D_i[n, n] = alpha * op(X_i) op(X_i)^T + beta * C_i + shift * I for
//   i < batch, op(X_i) [n, k], k >= 1 (trans: X_i is stored [k, n], so D_i = X_i^T X_i). C_i is symmetric
//   and only its upper triangle is read (not at all when beta = 0); C may be D. D_i is written in
//   full and exactly symmetric. A Gram product: half the multiply-adds of a general one (only the
//   upper triangle is computed, then mirrored). Precision: the CUDA backend reads X as bf16 in
//   both modes (tensor cores, fp32 accumulation: Newton-Schulz's need); a product that needs fp32
//   operands on the GPU uses gemm_batched.
#define MOETRAIN_OPS_GEMM(X, T, AP, CAP)                                                           \
  X(void, gemm, (bool trans_a, bool trans_b, int M, int N, int K, T alpha, CAP A, int lda,         \
                 CAP B, int ldb, T beta, AP C, int ldc),                                           \
    (trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc), 2.0 * M * N * K)             \
  X(void, gemm_batched, (bool trans_a, bool trans_b, int M, int N, int K, T alpha, CAP A,          \
                         int lda, std::size_t stride_a, CAP B, int ldb, std::size_t stride_b,      \
                         T beta, AP C, int ldc, std::size_t stride_c, int batch),                  \
    (trans_a, trans_b, M, N, K, alpha, A, lda, stride_a, B, ldb, stride_b, beta, C, ldc,           \
     stride_c, batch), 2.0 * M * N * K * batch)                                                    \
  X(void, grouped_gemm, (bool trans_b, int rows, int N, int K, T alpha, CAP A, int lda,            \
                         CAP B, int ldb, std::size_t stride_b, T beta, AP C, int ldc,              \
                         const std::int32_t* offsets, int groups),                                 \
    (trans_b, rows, N, K, alpha, A, lda, B, ldb, stride_b, beta, C, ldc, offsets, groups),         \
    2.0 * rows * N * K)                                                                            \
  X(void, grouped_gemm_wgrad, (int rows, int M, int N, T alpha, CAP A, int lda, CAP B,             \
                               int ldb, AP C, int ldc, std::size_t stride_c,                       \
                               const std::int32_t* offsets, int groups),                           \
    (rows, M, N, alpha, A, lda, B, ldb, C, ldc, stride_c, offsets, groups), 2.0 * rows * M * N) \
  X(void, symmetric_gemm_batched, (bool trans, int n, int k, T alpha, CAP X, int ldx,              \
                                   std::size_t stride_x, T beta, CAP C, int ldc,                   \
                                   std::size_t stride_c, T shift, AP D, int ldd,                   \
                                   std::size_t stride_d, int batch),                               \
    (trans, n, k, alpha, X, ldx, stride_x, beta, C, ldc, stride_c, shift, D, ldd, stride_d, batch), \
    1.0 * n * (n + 1) * k * batch)

// add_inplace: x += y.
#define MOETRAIN_OPS_ELEMENTWISE(X, T, AP, CAP)                                                    \
  X(void, add_inplace, (AP x, CAP y, std::size_t n), (x, y, n), 0)

// Reductions and optimizer steps (fp32 or wider accumulation, deterministic). Nothing here returns
// a value to the host: reductions add into a device double (`acc`: *acc += ...), so a step's
// statistics stay on the device until the trainer's one download per step. `gate` is the step's
// StepGate (device doubles, may be null): when gate[kSkip] is nonzero the update ops write nothing.
// sum_squares: *acc += sum x_i^2.
// scale_by: x *= *factor (a device double); nothing when *factor == 1.
// step_gate: from rank_sums [world][per_rank] (each rank's gradient sum of squares, then its loss
//   sums, in rank order): gate[kGradSumSquares] = the sum over ranks (in rank order);
//   gate[kSkip] = 1 when that or a loss is not finite, else 0; gate[kClipCoef] = max_norm /
//   (sqrt(sum) + 1e-6) when max_norm > 0, not skipped and that is below 1, else 1.
// axpby: y = a * x + b * y.
// frobenius_normalize: X_i /= (norm_scale * ||X_i||_F + eps) for `batch` contiguous matrices of
//   `elems`.
// adamw_update: bias-corrected, decoupled decay; *acc += sum of (m_hat / (sqrt(v_hat) + eps))^2.
// muon_momentum: M = mu * M + G; U = G + mu * M (Nesterov) or M. Skipped: U is not written either.
// muon_update: W -= lr * (s * O + wd * W); *acc += sum of (s * O)^2.
// qk_clip_factors: factors and *clipped += the number of clipped q heads (see QkClipShape); all
//   factors 1 when skipped.
// scale_row_blocks: x[b * block_elems + i] *= factors[b] for b < blocks (factors: device, [blocks]).
// sign_inplace: x = sign(x) (sign(0) = 0).
// second_moment_normalize: for `batch` contiguous [rows, cols] matrices O_b, with r the per-row
//   mean of O_b^2 ([rows], per_row) or O_b^2 itself: v_b = beta v_b + (1 - beta) r (v: [batch,
//   rows] or [batch, rows, cols]); O_b = O_b / (sqrt(v_b) + eps), broadcast along rows when
//   per_row; then O_b *= target / (||O_b||_F + eps), target = target_norm when > 0, else the
//   Frobenius norm O_b had on entry. Skipped: v is not written (O may be).
// lerp_update: x = beta * x + (1 - beta) * y (exactly y when beta = 0).
// soap_precondition: v = beta2 * v + (1 - beta2) * g^2; D = m / (sqrt(v) + eps). Skipped: v is
//   not written (D may be).
#define MOETRAIN_OPS_OPTIMIZER(X, T, AP, CAP)                                                      \
  X(void, sum_squares, (const T* x, std::size_t n, double* acc), (x, n, acc), 0)                   \
  X(void, scale, (T* x, std::size_t n, double s), (x, n, s), 0)                                    \
  X(void, scale_by, (T* x, std::size_t n, const double* factor), (x, n, factor), 0)                \
  X(void, step_gate, (double* gate, const double* rank_sums, int world, int per_rank,              \
                      double max_norm), (gate, rank_sums, world, per_rank, max_norm), 0)           \
  X(void, axpby, (T* y, const T* x, std::size_t n, double a, double b), (y, x, n, a, b), 0)        \
  X(void, frobenius_normalize, (T* x, int batch, std::size_t elems, double norm_scale,            \
                                double eps), (x, batch, elems, norm_scale, eps), 0)                                                                     \
  X(void, adamw_update, (T* p, const T* g, T* m, T* v, std::size_t n, double lr, double beta1,     \
                         double beta2, double eps, double weight_decay, std::int64_t t,            \
                         const double* gate, double* acc),                                         \
    (p, g, m, v, n, lr, beta1, beta2, eps, weight_decay, t, gate, acc), 0)                         \
  X(void, muon_momentum, (T* M, T* U, const T* G, std::size_t n, double mu, bool nesterov,         \
                          const double* gate), (M, U, G, n, mu, nesterov, gate), 0)                \
  X(void, muon_update, (T* W, const T* O, std::size_t n, double lr, double s,                      \
                        double weight_decay, const double* gate, double* acc),                     \
    (W, O, n, lr, s, weight_decay, gate, acc), 0)                                                  \
  X(void, qk_clip_factors, (T* factors, double* clipped, const T* smax,                            \
                            const std::int32_t* mats, const QkClipShape& s, const double* gate),   \
    (factors, clipped, smax, mats, s, gate), 0)                                                    \
  X(void, scale_row_blocks, (T* x, int blocks, std::size_t block_elems, const T* factors),         \
    (x, blocks, block_elems, factors), 0)                                                          \
  X(void, sign_inplace, (T* x, std::size_t n), (x, n), 0)                                          \
  X(void, second_moment_normalize, (T* O, T* v, int batch, int rows, int cols, bool per_row,       \
                                    double beta, double eps, double target_norm,                   \
                                    const double* gate),                                           \
    (O, v, batch, rows, cols, per_row, beta, eps, target_norm, gate), 0)                           \
  X(void, lerp_update, (T* x, const T* y, std::size_t n, double beta, const double* gate),         \
    (x, y, n, beta, gate), 0)                                                                      \
  X(void, soap_precondition, (T* D, T* v, const T* m, const T* g, std::size_t n, double beta2,     \
                              double eps, const double* gate),                                     \
    (D, v, m, g, n, beta2, eps, gate), 0)

// Dense linear algebra on `batch` contiguous row-major n x n matrices (optimizer workspaces): the
// CPU through LAPACK (OpenBLAS), CUDA through cuSOLVER.
// symmetric_eigenvectors_batched: Q_i's columns are eigenvectors of the symmetric P_i, ordered
//   by descending eigenvalue (LAPACK ?syevd; each column's sign as the solver gives it).
// qr_orthonormalize_batched: Q_i = the Q of A_i = Q_i R_i (Householder, ?geqrf + ?orgqr).
// sort_eigenbasis: SOAP's refresh ordering. With e_j = (Q_i^T P Q_i)_jj = sum_r Q_i[r, j] PQ_i[r,
//   j] (PQ_i = P Q_i) and o the stable order of descending e (NaN last): sorted_i[:, j] =
//   PQ_i[:, o_j], and v_out_i = v_i [v_rows, v_cols] with its rows (v_rows_axis; v_rows = n) or
//   columns (v_cols = n) permuted by o.
#define MOETRAIN_OPS_LINALG(X, T, AP, CAP)                                                         \
  X(void, symmetric_eigenvectors_batched, (T* Q, const T* P, int n, int batch),                    \
    (Q, P, n, batch), 0)                                                                           \
  X(void, qr_orthonormalize_batched, (T* Q, const T* A, int n, int batch), (Q, A, n, batch), 0)    \
  X(void, sort_eigenbasis, (T* sorted, T* v_out, const T* Q, const T* PQ, const T* v, int n,       \
                            int batch, int v_rows, int v_cols, bool v_rows_axis),                  \
    (sorted, v_out, Q, PQ, v, n, batch, v_rows, v_cols, v_rows_axis), 0)

// embedding_backward: dtable[tokens[i]] += dout[i]; deterministic (no float atomics).
#define MOETRAIN_OPS_EMBEDDING(X, T, AP, CAP)                                                      \
  X(void, embedding_forward, (AP out, const std::int32_t* tokens, const T* table, int n,           \
                              int d), (out, tokens, table, n, d), 0)                               \
  X(void, embedding_backward, (T* dtable, CAP dout, const std::int32_t* tokens, int n,             \
                               int d), (dtable, dout, tokens, n, d), 0)

// RMSNorm with fp32 or wider statistics; backward accumulates: dx += ..., dgain += ...
#define MOETRAIN_OPS_RMSNORM(X, T, AP, CAP)                                                        \
  X(void, rmsnorm_forward, (AP out, T* rstd, CAP x, const T* gain, int n, int d,                   \
                            double eps), (out, rstd, x, gain, n, d, eps), 0)                       \
  X(void, rmsnorm_backward, (AP dx, T* dgain, CAP dout, CAP x, const T* gain,                      \
                             const T* rstd, int n, int d), (dx, dgain, dout, x, gain, rstd, n, d), 0)

// RoPE (half-split convention), in place on n_heads heads of each row. Row r is at position
// r % seq; cos/sin tables are [seq, head_dim/2].
#define MOETRAIN_OPS_ROPE(X, T, AP, CAP)                                                           \
  X(void, rope_forward, (AP x, int ld, int rows, int seq, int n_heads, int head_dim,               \
                         const T* cos, const T* sin), (x, ld, rows, seq, n_heads, head_dim, cos, sin), 0) \
  X(void, rope_backward, (AP dx, int ld, int rows, int seq, int n_heads, int head_dim,             \
                          const T* cos, const T* sin), (dx, ld, rows, seq, n_heads, head_dim, cos, sin), 0)

// Causal attention. out[rows, n_heads*head_dim]; smax[h] = max over the batch, i, j<=i of
// q_i.k_j / sqrt(hd). `saved` holds attention_saved_elems(s) elements kept for backward (both
// backends: the logsumexp of each row, [B, H, T]). Backward writes (overwrites) dqkv from
// dout and the forward's qkv, out and saved.
#define MOETRAIN_OPS_ATTENTION(X, T, AP, CAP)                                                      \
  X(void, attention_forward, (AP out, T* saved, T* smax, CAP qkv,                                  \
                              const AttentionShape& s), (out, saved, smax, qkv, s), 0)             \
  X(void, attention_backward, (AP dqkv, CAP dout, CAP qkv, CAP out, const T* saved,                \
                               const AttentionShape& s), (dqkv, dout, qkv, out, saved, s), 0)

// SwiGLU on a fused [rows, 2*ff] input (w1 x | w3 x): out = silu(h1) * h3.
#define MOETRAIN_OPS_SWIGLU(X, T, AP, CAP)                                                         \
  X(void, swiglu_forward, (AP out, CAP h, int rows, int ff), (out, h, rows, ff), 0)                \
  X(void, swiglu_backward, (AP dh, CAP dout, CAP h, int rows, int ff),                             \
    (dh, dout, h, rows, ff), 0)

// losses[i] = logsumexp(logits_i) - logits_i[target_i] (0 for a negative target: padding), and
// *loss_sum += sum_i losses[i] (a device double, may be null; deterministic). When grad_scale is
// not null the logits are overwritten by d(s * sum_i losses[i]) / dlogits, s = *grad_scale read on
// the device (a device scalar, so a captured step replays with each micro-batch's own scale).
#define MOETRAIN_OPS_CROSS_ENTROPY(X, T, AP, CAP)                                                  \
  X(void, cross_entropy, (T* losses, double* loss_sum, AP logits, const std::int32_t* targets,     \
                         int n, int vocab, const T* grad_scale),                                          \
    (losses, loss_sum, logits, targets, n, vocab, grad_scale), 0)

// Router forward: from logits [tokens, E]: scores [tokens, E] (softmax probabilities or sigmoid
// scores), top-k expert ids (by score, or score + bias for sigmoid_bias; ties toward the lower
// index), gate weights [tokens, k], counts[E] (assignments per expert), and
// stats = {L_aux, L_z, mean router entropy}.
// Router backward: dlogits from the gate-weight gradients `dgates` (which already carry the
// caller's grad_scale, coming from the loss) plus grad_scale * (aux_coef * dL_aux + z_coef * dL_z).
#define MOETRAIN_OPS_ROUTER(X, T, AP, CAP)                                                         \
  X(void, router_forward, (T* scores, std::int32_t* topk, T* gates, std::int32_t* counts,          \
                           T* stats, const T* logits, const T* bias, const RouterShape& s),        \
    (scores, topk, gates, counts, stats, logits, bias, s), 0)                                      \
  X(void, router_backward, (T* dlogits, const T* dgates, const T* logits, const T* scores,         \
                            const std::int32_t* topk, const T* gates, const std::int32_t* counts,  \
                            const RouterShape& s, double aux_coef, double z_coef,                  \
                            double grad_scale),                                                    \
    (dlogits, dgates, logits, scores, topk, gates, counts, s, aux_coef, z_coef, grad_scale), 0)

// Token permutation. moe_permute groups the tokens*k assignments by expert (stable in token
// order): offsets[E+1] (exclusive scan of counts), pos[t*k+j] = row of assignment (t, j) in the
// grouped buffer, xg[row] = x[t]. moe_permute_backward: dx[t] += sum_j dxg[pos[t*k+j]].
// moe_unpermute: y[t] = sum_j gates[t,j] * yg[pos[t*k+j]]. Its backward:
// dyg[pos[t*k+j]] = gates[t,j] * dy[t]; dgates[t,j] = dy[t] . yg[pos[t*k+j]].
#define MOETRAIN_OPS_MOE_PERMUTE(X, T, AP, CAP)                                                    \
  X(void, moe_permute, (AP xg, std::int32_t* pos, std::int32_t* offsets, CAP x,                    \
                        const std::int32_t* topk, const std::int32_t* counts, int tokens, int d,   \
                        int n_experts, int k),                                                     \
    (xg, pos, offsets, x, topk, counts, tokens, d, n_experts, k), 0)                               \
  X(void, moe_permute_backward, (AP dx, CAP dxg, const std::int32_t* pos, int tokens,              \
                                 int d,                                                            \
                                 int k), (dx, dxg, pos, tokens, d, k), 0)                          \
  X(void, moe_unpermute, (AP y, CAP yg, const T* gates, const std::int32_t* pos,                   \
                          int tokens,                                                              \
                          int d, int k), (y, yg, gates, pos, tokens, d, k), 0)                     \
  X(void, moe_unpermute_backward, (AP dyg, T* dgates, CAP dy, CAP yg, const T* gates,              \
                                   const std::int32_t* pos, int tokens, int d, int k),             \
    (dyg, dgates, dy, yg, gates, pos, tokens, d, k), 0)

// The ops with the activation pointer types AP (mutable) and CAP (const): the interface's DevPtr
// and CDevPtr; the CPU backend's implementations take T* and const T* (its activations are T).
#define MOETRAIN_BACKEND_OPS_AS(X, T, AP, CAP)                                                     \
  MOETRAIN_OPS_GEMM(X, T, AP, CAP)                                                                 \
  MOETRAIN_OPS_ELEMENTWISE(X, T, AP, CAP)                                                          \
  MOETRAIN_OPS_OPTIMIZER(X, T, AP, CAP)                                                            \
  MOETRAIN_OPS_LINALG(X, T, AP, CAP)                                                               \
  MOETRAIN_OPS_EMBEDDING(X, T, AP, CAP)                                                            \
  MOETRAIN_OPS_RMSNORM(X, T, AP, CAP)                                                              \
  MOETRAIN_OPS_ROPE(X, T, AP, CAP)                                                                 \
  MOETRAIN_OPS_ATTENTION(X, T, AP, CAP)                                                            \
  MOETRAIN_OPS_SWIGLU(X, T, AP, CAP)                                                               \
  MOETRAIN_OPS_CROSS_ENTROPY(X, T, AP, CAP)                                                        \
  MOETRAIN_OPS_ROUTER(X, T, AP, CAP)                                                               \
  MOETRAIN_OPS_MOE_PERMUTE(X, T, AP, CAP)
#define MOETRAIN_BACKEND_OPS(X, T) MOETRAIN_BACKEND_OPS_AS(X, T, DevPtr, CDevPtr)

// Queries (const, untimed): activation_storage is the storage of the activations this backend's
// ops take (bf16 in bf16 mode, else T: fp32, or the CPU's double); attention_saved_elems is the
// size of attention's `saved` buffer; head_chunk_rows the rows (1 ... rows) the model's lm_head
// and cross-entropy run at a time, so only [head_chunk_rows, vocab] logits ever exist (the CPU: a
// chunk of about 1 MiB of fp32 logits, which stays in its core's L2 from the lm_head GEMM through
// cross-entropy to the two gradient GEMMs; CUDA: chunks of up to 64 Mi logits, large enough that
// each GEMM still fills the GPU);
// available_memory_bytes what this process can still allocate on the backend's device (the CPU:
// MemAvailable of /proc/meminfo, lowered to the cgroup v2 limit's headroom when one is set; CUDA:
// cudaMemGetInfo's free bytes), SIZE_MAX when unknown.
#define MOETRAIN_BACKEND_QUERIES(X, T)                                                             \
  X(Storage, activation_storage, (), (), 0)                                                        \
  X(std::size_t, attention_saved_elems, (const AttentionShape& s), (s), 0)                         \
  X(int, head_chunk_rows, (int rows, int vocab), (rows, vocab), 0)                                 \
  X(std::size_t, available_memory_bytes, (), (), 0)

// Expansions shared by the interface and its implementations.
#define MOETRAIN_OP_PURE(ret, name, params, args, flops) virtual ret name params = 0;
#define MOETRAIN_QUERY_PURE(ret, name, params, args, flops) virtual ret name params const = 0;
#define MOETRAIN_OP_OVERRIDE(ret, name, params, args, flops) ret name params override;
#define MOETRAIN_QUERY_OVERRIDE(ret, name, params, args, flops) ret name params const override;

// clang-format on
