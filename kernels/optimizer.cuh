// kernels/optimizer.cuh — elementwise and reduction steps of AdamW, Muon, MuonClip, NorMuon,
// AdaMuon and SOAP
// (docs/design.md §4) on the GPU. Host-side launchers only; kernels in optimizer.cu. CPU
// references: src/backend/cpu/optimizer_ops.cpp (Backend::adamw_update, sum_squares, muon_momentum,
// muon_update, frobenius_normalize, scale) and src/optim/optimizer.cpp (how they are used).
//
// Storage: gradients, AdamW moments and Muon momentum are fp32. Updated weights TW are either fp32
// master weights (optionally mirrored into a bf16 copy, `w_copy`, may be null) or bf16 weights
// updated in fp32 and stored back; every bf16 result of an update is rounded stochastically with
// float_to_bf16_stochastic(x, random_u32(seed, rng_offset + i)) for element i, so the rounding of
// an element does not depend on the launch configuration (pass the element's offset in the whole
// parameter buffer as rng_offset and a fresh seed per step).
//
// Reductions (returned sums of squares) are deterministic: each block of a grid that depends only
// on n writes one double partial to `workspace` (optimizer_workspace_elems() doubles), then one
// block adds the partials in block order into *out (a device double; with accumulate, *out += sum,
// so one value can collect a sum over many launches in a fixed order). out may be null.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.cuh"

namespace moetrain::kernels {

// The step's verdict (Backend::step_gate; the indices of moetrain::StepGate): the gradients' global
// sum of squares, the clipping coefficient, and skip (nonzero: the update kernels write nothing).
// The update launchers take `skip` = gate + kGateSkip (null: never skipped).
constexpr int kGateGradSumSquares = 0, kGateClipCoef = 1, kGateSkip = 2;

// Doubles of `workspace` the reducing launchers below need.
std::size_t optimizer_workspace_elems();

// AdamW hyper-parameters for step t (>= 1), bias corrections included (computed in double).
struct AdamWParams {
  float lr, beta1, beta2, eps, weight_decay;
  float bias_correction1, bias_correction2;  // 1 - beta^t
};
AdamWParams adamw_params(double lr, double beta1, double beta2, double eps, double weight_decay,
                         std::int64_t t);

// With g = grad_scale * grad (grad_scale folds the 1/world averaging and the global-norm clip
// coefficient into this pass, so no separate scaling pass over the gradients is needed; pass 1 for
// none): m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; u = (m / bc1) / (sqrt(v / bc2) + eps);
// w -= lr (u + wd w). out_sumsq (optional): sum of u^2.
template <typename TW>
void adamw_update(TW* w, __nv_bfloat16* w_copy, const float* grad, float grad_scale, float* m,
                  float* v, std::size_t n, const AdamWParams& p, std::uint64_t seed,
                  std::uint64_t rng_offset, const double* skip, double* workspace,
                  double* out_sumsq, bool accumulate, cudaStream_t stream);

// *out (+)= sum_i x_i^2, accumulated in double: the global gradient norm is sqrt of that.
template <typename T>
void sum_squares(const T* x, std::size_t n, double* workspace, double* out, bool accumulate,
                 cudaStream_t stream);
// *out (+)= sum_i x_i, accumulated in double (the cross-entropy's loss sum).
template <typename T>
void sum(const T* x, std::size_t n, double* workspace, double* out, bool accumulate,
         cudaStream_t stream);

// x *= *factor (a device double, e.g. gate + kGateClipCoef); the kernel returns at once when the
// factor is 1, so an unclipped step costs one launch and no pass over x.
template <typename T>
void scale_by(T* x, std::size_t n, const double* factor, cudaStream_t stream);

// The step's verdict into gate[0..3) from rank_sums [world][per_rank] (Backend::step_gate).
void step_gate(double* gate, const double* rank_sums, int world, int per_rank, double max_norm,
               cudaStream_t stream);

// QK-clip's per-head factors on the device (Backend::qk_clip_factors; QkClipShape in
// include/backend/moetrain/op_shapes.hpp, whose fields these are).
struct QkClipDims {
  int matrices, slots, n_layers, n_heads, n_kv_heads, heads_ld;
  double tau, alpha;
};
void qk_clip_factors(float* factors, double* clipped, const float* smax, const std::int32_t* mats,
                     const QkClipDims& s, const double* skip, cudaStream_t stream);

// With G = grad_scale * grad (as for AdamW): M = mu M + G; U = G + mu M (nesterov) or U = M (U
// fp32, or bf16 rounded to nearest for a bf16 Newton-Schulz).
template <typename TU>
void muon_momentum(float* M, TU* U, const float* grad, float grad_scale, std::size_t n, float mu,
                   bool nesterov, const double* skip, cudaStream_t stream);

// W -= lr (s O + wd W). out_sumsq (optional): sum of (s O)^2 (for the update RMS).
template <typename TW, typename TO>
void muon_update(TW* w, __nv_bfloat16* w_copy, const TO* O, std::size_t n, float lr, float s,
                 float weight_decay, std::uint64_t seed, std::uint64_t rng_offset,
                 const double* skip, double* workspace, double* out_sumsq, bool accumulate,
                 cudaStream_t stream);

// out_b = in_b / (norm_scale ||in_b||_F + eps) for `batch` contiguous matrices of `elems` elements
// (norm in double, deterministic; out may alias in when TIn == TOut). bf16 outputs round to
// nearest.
std::size_t frobenius_workspace_elems(int batch, std::size_t elems);
template <typename TIn, typename TOut>
void frobenius_normalize(TOut* out, const TIn* in, int batch, std::size_t elems, double norm_scale,
                         double eps, double* workspace, cudaStream_t stream);

// QK-clip row scaling: w[b * block_elems + i] *= factors[b] for b < row_blocks (a block is a
// contiguous run of rows, e.g. the head_dim rows of one head of q_proj or k_proj, block_elems =
// head_dim * d_model). factors is a device array; blocks whose factor is exactly 1 are not touched.
// bf16 results (TW = bf16, or the copy of fp32 master weights) are rounded to nearest.
template <typename TW>
void scale_row_blocks(TW* w, __nv_bfloat16* w_copy, int row_blocks, std::size_t block_elems,
                      const float* factors, cudaStream_t stream);

// ---- NorMuon, AdaMuon, SOAP (Backend::sign_inplace, second_moment_normalize, lerp_update,
// soap_precondition; fp32) ----------------------------------------------------------------------

// x = sign(x), sign(0) = 0.
void sign_inplace(float* x, std::size_t n, cudaStream_t stream);

// For `batch` contiguous [rows, cols] matrices O_b (Backend::second_moment_normalize): v_b = beta
// v_b + (1 - beta) r_b, r_b = the per-row mean of O_b^2 (per_row; v [batch, rows]) or O_b^2 (v
// [batch, rows, cols]); O_b /= sqrt(v_b) + eps; then O_b *= target / (||O_b||_F + eps), target =
// target_norm if > 0, else O_b's norm on entry. One block per row (sums in double, fixed order),
// then one per matrix. `workspace`: second_moment_workspace_elems(batch, rows) doubles. Skipped:
// v is not written.
std::size_t second_moment_workspace_elems(int batch, int rows);
void second_moment_normalize(float* O, float* v, int batch, int rows, int cols, bool per_row,
                             float beta, float eps, double target_norm, double* workspace,
                             const double* skip, cudaStream_t stream);

// x = beta x + (1 - beta) y, exactly y when beta = 0; skipped: nothing written.
void lerp_update(float* x, const float* y, std::size_t n, float beta, const double* skip,
                 cudaStream_t stream);

// v = beta2 v + (1 - beta2) g^2 (not written when skipped); D = m / (sqrt(v) + eps). D may alias m.
void soap_precondition(float* D, float* v, const float* m, const float* g, std::size_t n,
                       float beta2, float eps, const double* skip, cudaStream_t stream);

}  // namespace moetrain::kernels
