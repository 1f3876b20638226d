// kernels/optimizer.cu — AdamW, Muon, QK-clip, NorMuon, AdaMuon and SOAP elementwise steps and
// their reductions (contract: optimizer.cuh; CPU reference src/backend/cpu/optimizer_ops.cpp).
//
// Every kernel is a grid-stride loop over the elements with coalesced 4-byte (fp32) or 2-byte
// (bf16) accesses, fp32 arithmetic, and — where a sum of squares is wanted — a per-thread double
// accumulator, block_sum (fixed butterfly order) and one partial per block. The grid is a function
// of n only (at most kReduceMaxBlocks blocks), and reduce_finalize_kernel adds the partials in
// block order: the same inputs give the same bits on every GPU and every run.
#include "optimizer.cuh"
#include "pack.cuh"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace moetrain::kernels {

namespace {

constexpr int kThreads = 256;
constexpr int kItemsPerThread = 4;  // elements per thread before the grid stops growing
constexpr int kUnroll = 4;          // independent loads per thread in the pure-read reductions
constexpr int kReduceMaxBlocks = 1024;
constexpr int kFinalizeThreads = 1024;
constexpr int kFrobChunkElems = kThreads * 16;
constexpr int kFrobMaxChunks = 64;
constexpr int kScaleMaxChunks = 256;

int grid_for(std::size_t n) {
  const std::size_t b =
      (n + std::size_t(kThreads) * kItemsPerThread - 1) / (std::size_t(kThreads) * kItemsPerThread);
  return static_cast<int>(std::clamp<std::size_t>(b, 1, kReduceMaxBlocks));
}

// Stores an updated weight: fp32 master (+ optional stochastically rounded bf16 copy), or a bf16
// weight rounded stochastically.
template <typename TW>
__device__ __forceinline__ void store_weight(TW* w, __nv_bfloat16* w_copy, std::size_t i,
                                             float value, std::uint64_t seed,
                                             std::uint64_t rng_offset) {
  if constexpr (std::is_same_v<TW, float>) {
    w[i] = value;
    if (w_copy != nullptr)
      w_copy[i] = float_to_bf16_stochastic(value, random_u32(seed, rng_offset + i));
  } else {
    w[i] = float_to_bf16_stochastic(value, random_u32(seed, rng_offset + i));
  }
}

// Stores a value rounded to nearest (for scaling, where no accumulation of rounding bias happens).
template <typename TW>
__device__ __forceinline__ void store_weight_rn(TW* w, __nv_bfloat16* w_copy, std::size_t i,
                                                float value) {
  if constexpr (std::is_same_v<TW, float>) {
    w[i] = value;
    if (w_copy != nullptr) w_copy[i] = float_to_bf16(value);
  } else {
    w[i] = float_to_bf16(value);
  }
}

__device__ __forceinline__ bool is_finite(double x) {
  return fabs(x) <= DBL_MAX;  // false for NaN and both infinities
}

__device__ __forceinline__ bool skipped(const double* skip) {
  return skip != nullptr && *skip != 0.0;
}

__device__ __forceinline__ void write_partial(double* partials, double v) {
  v = block_sum(v);
  if (partials != nullptr && thread_rank() == 0) partials[blockIdx.x] = v;
}

// ---- reduction finalize ------------------------------------------------------------------------
__global__ void __launch_bounds__(kFinalizeThreads)
    reduce_finalize_kernel(double* __restrict__ out, const double* __restrict__ partials, int count,
                           bool accumulate) {
  const int tid = static_cast<int>(thread_rank());
  double s = 0.0;
  for (int i = tid; i < count; i += kFinalizeThreads) s += partials[i];
  s = block_sum(s);
  if (tid == 0) *out = (accumulate ? *out : 0.0) + s;
}

void finalize(double* out, const double* partials, int count, bool accumulate,
              cudaStream_t stream) {
  if (out == nullptr) return;
  launch(reduce_finalize_kernel, dim3(1), dim3(kFinalizeThreads), 0, stream, out, partials, count,
         accumulate);
}

// ---- AdamW -------------------------------------------------------------------------------------
template <typename TW>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(TW* __restrict__ w, __nv_bfloat16* __restrict__ w_copy,
                 const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
                 std::size_t n, float grad_scale, AdamWParams p, std::uint64_t seed,
                 std::uint64_t rng_offset, const double* __restrict__ skip,
                 double* __restrict__ partials) {
  if (skipped(skip)) n = 0;  // the partials are still written: the step's sum stays defined
  const float one_minus_b1 = 1.0f - p.beta1, one_minus_b2 = 1.0f - p.beta2;
  double sq = 0.0;
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const float gi = g[i] * grad_scale;
    const float mi = p.beta1 * m[i] + one_minus_b1 * gi;
    const float vi = p.beta2 * v[i] + one_minus_b2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float u = (mi / p.bias_correction1) / (sqrtf(vi / p.bias_correction2) + p.eps);
    const float wi = to_float(w[i]);
    store_weight(w, w_copy, i, wi - p.lr * (u + p.weight_decay * wi), seed, rng_offset);
    sq += static_cast<double>(u) * u;
  }
  write_partial(partials, sq);
}

// ---- sum of squares -----------------------------------------------------------------------------
template <typename T, bool kSquare>
__global__ void __launch_bounds__(kThreads)
    sum_kernel(const T* __restrict__ x, std::size_t n, double* __restrict__ partials) {
  // kUnroll independent loads per thread and iteration keep enough bytes in flight for a pure
  // stream.
  double sq = 0.0;
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t base = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; base < n;
       base += kUnroll * stride) {
    float xv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const std::size_t i = base + u * stride;
      xv[u] = i < n ? to_float(x[i]) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      sq += kSquare ? static_cast<double>(xv[u]) * xv[u] : static_cast<double>(xv[u]);
  }
  write_partial(partials, sq);
}

// ---- scaling by a device factor, the step's verdict ---------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads)
    scale_by_kernel(T* __restrict__ x, std::size_t n, const double* __restrict__ factor) {
  const double f = *factor;
  if (f == 1.0) return;
  const float ff = static_cast<float>(f);
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    if constexpr (std::is_same_v<T, float>) {
      x[i] *= ff;
    } else {
      x[i] = float_to_bf16(to_float(x[i]) * ff);
    }
  }
}

// One thread: the sums are few (one per rank and micro-batch), and a fixed serial order is what
// makes every rank's verdict identical.
__global__ void step_gate_kernel(double* __restrict__ gate, const double* __restrict__ rank_sums,
                                 int world, int per_rank, double max_norm) {
  double sum = 0.0;
  bool finite = true;
  for (int r = 0; r < world; ++r) {
    const double* own = rank_sums + static_cast<std::size_t>(r) * per_rank;
    sum += own[0];
    for (int i = 1; i < per_rank; ++i) finite = finite && is_finite(own[i]);
  }
  const double norm = sqrt(sum);
  const bool skip = !finite || !is_finite(norm);
  const double coef = max_norm / (norm + 1e-6);
  gate[kGateGradSumSquares] = sum;
  gate[kGateSkip] = skip ? 1.0 : 0.0;
  gate[kGateClipCoef] = (!skip && max_norm > 0.0 && coef < 1.0) ? coef : 1.0;
}

// ---- QK-clip factors: one thread per (matrix, kv head) ------------------------------------------
__global__ void __launch_bounds__(kThreads)
    qk_clip_factors_kernel(float* __restrict__ factors, double* __restrict__ clipped,
                           const float* __restrict__ smax, const std::int32_t* __restrict__ mats,
                           QkClipDims s, const double* __restrict__ skip) {
  const int tid = static_cast<int>(threadIdx.x);
  for (int i = tid; i < s.matrices * s.heads_ld; i += kThreads) factors[i] = 1.0f;
  __syncthreads();  // then each (matrix, kv head) writes only the factors it owns
  const int group = s.n_heads / s.n_kv_heads;
  const std::size_t layer_elems = static_cast<std::size_t>(s.n_layers) * s.n_heads;
  double count = 0.0;
  const int items = skipped(skip) ? 0 : s.matrices * s.n_kv_heads;
  for (int item = tid; item < items; item += kThreads) {
    const int m = item / s.n_kv_heads, g = item % s.n_kv_heads;
    const int layer = mats[2 * m];
    const bool is_q = mats[2 * m + 1] != 0;
    float* f = factors + static_cast<std::size_t>(m) * s.heads_ld;
    double gmin = 1.0;
    for (int h = g * group; h < (g + 1) * group; ++h) {
      double mx = -HUGE_VAL;
      for (int slot = 0; slot < s.slots; ++slot)
        mx = fmax(mx, static_cast<double>(smax[static_cast<std::size_t>(slot) * layer_elems +
                                               static_cast<std::size_t>(layer) * s.n_heads + h]));
      if (!(mx > s.tau)) continue;
      const double gamma = s.tau / mx;
      gmin = fmin(gmin, gamma);
      if (is_q) {
        count += 1.0;
        f[h] = static_cast<float>(pow(gamma, s.alpha));
      }
    }
    if (!is_q && gmin < 1.0) f[g] = static_cast<float>(pow(gmin, 1.0 - s.alpha));
  }
  count = block_sum(count);
  if (threadIdx.x == 0) *clipped += count;
}

// ---- Muon ---------------------------------------------------------------------------------------
template <typename TU>
__global__ void __launch_bounds__(kThreads)
    muon_momentum_kernel(float* __restrict__ M, TU* __restrict__ U, const float* __restrict__ G,
                         std::size_t n, float grad_scale, float mu, bool nesterov,
                         const double* __restrict__ skip) {
  if (skipped(skip)) return;
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const float gi = G[i] * grad_scale;
    const float mi = mu * M[i] + gi;
    M[i] = mi;
    const float ui = nesterov ? gi + mu * mi : mi;
    if constexpr (std::is_same_v<TU, float>) {
      U[i] = ui;
    } else {
      U[i] = float_to_bf16(ui);
    }
  }
}

template <typename TW, typename TO>
__global__ void __launch_bounds__(kThreads)
    muon_update_kernel(TW* __restrict__ w, __nv_bfloat16* __restrict__ w_copy,
                       const TO* __restrict__ O, std::size_t n, float lr, float s,
                       float weight_decay, std::uint64_t seed, std::uint64_t rng_offset,
                       const double* __restrict__ skip, double* __restrict__ partials) {
  if (skipped(skip)) n = 0;
  double sq = 0.0;
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const float u = s * to_float(O[i]);
    const float wi = to_float(w[i]);
    store_weight(w, w_copy, i, wi - lr * (u + weight_decay * wi), seed, rng_offset);
    sq += static_cast<double>(u) * u;
  }
  write_partial(partials, sq);
}

// ---- Frobenius normalisation: grid (chunks, batch) ----------------------------------------------
template <typename TIn>
__global__ void __launch_bounds__(kThreads)
    frobenius_partial_kernel(const TIn* __restrict__ in, std::size_t elems,
                             double* __restrict__ partials) {
  const TIn* x = in + static_cast<std::size_t>(blockIdx.y) * elems;
  const std::size_t chunk = (elems + gridDim.x - 1) / gridDim.x;
  const std::size_t begin = chunk * blockIdx.x, end = min(elems, begin + chunk);
  double sq = 0.0;
  for (std::size_t base = begin + threadIdx.x; base < end; base += kUnroll * kThreads) {
    float xv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const std::size_t i = base + u * kThreads;
      xv[u] = i < end ? to_float(x[i]) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) sq += static_cast<double>(xv[u]) * xv[u];
  }
  sq = block_sum(sq);
  if (threadIdx.x == 0)
    partials[static_cast<std::size_t>(blockIdx.y) * gridDim.x + blockIdx.x] = sq;
}

template <typename TIn, typename TOut>
__global__ void __launch_bounds__(kThreads)
    frobenius_scale_kernel(TOut* out, const TIn* in, std::size_t elems, double norm_scale,
                           double eps, const double* __restrict__ partials) {
  __shared__ float factor;
  if (threadIdx.x == 0) {
    double ss = 0.0;
    for (unsigned c = 0; c < gridDim.x; ++c)
      ss += partials[static_cast<std::size_t>(blockIdx.y) * gridDim.x + c];
    factor = static_cast<float>(1.0 / (norm_scale * sqrt(ss) + eps));
  }
  __syncthreads();
  const float f = factor;
  const std::size_t base = static_cast<std::size_t>(blockIdx.y) * elems;
  const std::size_t chunk = (elems + gridDim.x - 1) / gridDim.x;
  const std::size_t begin = chunk * blockIdx.x, end = min(elems, begin + chunk);
  for (std::size_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float y = to_float(in[base + i]) * f;
    if constexpr (std::is_same_v<TOut, float>) {
      out[base + i] = y;
    } else {
      out[base + i] = float_to_bf16(y);
    }
  }
}

int frobenius_chunks(std::size_t elems) {
  return static_cast<int>(
      std::clamp<std::size_t>((elems + kFrobChunkElems - 1) / kFrobChunkElems, 1, kFrobMaxChunks));
}

// ---- QK-clip row scaling: grid (chunks, row blocks) ---------------------------------------------
template <typename TW>
__global__ void __launch_bounds__(kThreads)
    scale_row_blocks_kernel(TW* __restrict__ w, __nv_bfloat16* __restrict__ w_copy,
                            std::size_t block_elems, const float* __restrict__ factors) {
  const float f = factors[blockIdx.y];
  if (f == 1.0f) return;  // uniform over the block: an unclipped head is not touched
  const std::size_t base = static_cast<std::size_t>(blockIdx.y) * block_elems;
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * kThreads;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * kThreads + threadIdx.x;
       i < block_elems; i += stride)
    store_weight_rn(w, w_copy, base + i, to_float(w[base + i]) * f);
}

int scale_chunks(std::size_t elems) {
  const std::size_t per = std::size_t(kThreads) * kItemsPerThread;
  return static_cast<int>(std::clamp<std::size_t>((elems + per - 1) / per, 1, kScaleMaxChunks));
}

// ---- NorMuon, AdaMuon, SOAP -------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads) sign_kernel(float* __restrict__ x, std::size_t n) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride)
    x[i] = static_cast<float>((x[i] > 0.0f) - (x[i] < 0.0f));
}

// Grid (rows, batch): row r of O_b, its second moment and its division; in_sq / out_sq [batch,
// rows] receive the row's sum of squares before and after.
__global__ void __launch_bounds__(kThreads)
    second_moment_rows_kernel(float* __restrict__ O, float* __restrict__ v, int rows, int cols,
                              bool per_row, float beta, float eps, double* __restrict__ in_sq,
                              double* __restrict__ out_sq, const double* __restrict__ skip) {
  const bool skip_v = skipped(skip);
  const std::size_t b = blockIdx.y, r = blockIdx.x, C = static_cast<std::size_t>(cols);
  const std::size_t row0 = (b * rows + r) * C;
  float* o = O + row0;
  double sq = 0.0;
  for (std::size_t c = threadIdx.x; c < C; c += kThreads) sq += static_cast<double>(o[c]) * o[c];
  sq = block_sum(sq);  // every thread has it
  double after = 0.0;
  if (per_row) {
    float* vr = v + b * rows + r;
    const float vn = beta * *vr + (1.0f - beta) * static_cast<float>(sq / static_cast<double>(C));
    __syncthreads();  // every thread read *vr before it changes
    if (threadIdx.x == 0 && !skip_v) *vr = vn;
    const float f = 1.0f / (sqrtf(vn) + eps);
    for (std::size_t c = threadIdx.x; c < C; c += kThreads) {
      const float y = o[c] * f;
      o[c] = y;
      after += static_cast<double>(y) * y;
    }
  } else {
    float* vr = v + row0;
    for (std::size_t c = threadIdx.x; c < C; c += kThreads) {
      const float x = o[c];
      const float vn = beta * vr[c] + (1.0f - beta) * x * x;
      if (!skip_v) vr[c] = vn;
      const float y = x / (sqrtf(vn) + eps);
      o[c] = y;
      after += static_cast<double>(y) * y;
    }
  }
  after = block_sum(after);
  if (threadIdx.x == 0) {
    in_sq[b * rows + r] = sq;
    out_sq[b * rows + r] = after;
  }
}

// One block per matrix: its factor target / (||O_b||_F + eps) from the row sums, in row order.
__global__ void __launch_bounds__(kThreads)
    second_moment_factor_kernel(double* __restrict__ factor, const double* __restrict__ in_sq,
                                const double* __restrict__ out_sq, int rows, double target_norm,
                                float eps) {
  const std::size_t b = blockIdx.x;
  double in = 0.0, out = 0.0;
  for (int r = static_cast<int>(threadIdx.x); r < rows; r += kThreads) {
    in += in_sq[b * rows + r];
    out += out_sq[b * rows + r];
  }
  in = block_sum(in);
  out = block_sum(out);
  if (threadIdx.x == 0) {
    const double target = target_norm > 0.0 ? target_norm : sqrt(in);
    factor[b] = static_cast<double>(static_cast<float>(target / (sqrt(out) + eps)));
  }
}

// Grid (chunks, batch): O_b *= factor[b].
__global__ void __launch_bounds__(kThreads)
    scale_matrices_kernel(float* __restrict__ O, std::size_t elems,
                          const double* __restrict__ factor) {
  const float f = static_cast<float>(factor[blockIdx.y]);
  float* o = O + static_cast<std::size_t>(blockIdx.y) * elems;
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * kThreads;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * kThreads + threadIdx.x; i < elems;
       i += stride)
    o[i] *= f;
}

__global__ void __launch_bounds__(kThreads)
    lerp_kernel(float* __restrict__ x, const float* __restrict__ y, std::size_t n, float beta,
                const double* __restrict__ skip) {
  if (skipped(skip)) return;
  const float a = 1.0f - beta;
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride)
    x[i] = beta == 0.0f ? y[i] : beta * x[i] + a * y[i];
}

__global__ void __launch_bounds__(kThreads)
    soap_precondition_kernel(float* D, float* __restrict__ v, const float* m,
                             const float* __restrict__ g, std::size_t n, float beta2, float eps,
                             const double* __restrict__ skip) {
  const bool skip_v = skipped(skip);
  const float a = 1.0f - beta2;
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const float vi = beta2 * v[i] + a * g[i] * g[i];
    if (!skip_v) v[i] = vi;
    D[i] = m[i] / (sqrtf(vi) + eps);
  }
}

}  // namespace

void sign_inplace(float* x, std::size_t n, cudaStream_t stream) {
  if (n == 0) return;
  launch(sign_kernel, dim3(grid_for(n)), dim3(kThreads), 0, stream, x, n);
}

std::size_t second_moment_workspace_elems(int batch, int rows) {
  return static_cast<std::size_t>(std::max(batch, 0)) * (2 * static_cast<std::size_t>(rows) + 1);
}

void second_moment_normalize(float* O, float* v, int batch, int rows, int cols, bool per_row,
                             float beta, float eps, double target_norm, double* workspace,
                             const double* skip, cudaStream_t stream) {
  if (batch <= 0 || rows <= 0 || cols <= 0) return;
  if (batch > 65535)
    throw std::invalid_argument("second_moment_normalize: batch " + std::to_string(batch) +
                                " > 65535");
  const std::size_t R = static_cast<std::size_t>(batch) * rows;
  double *in_sq = workspace, *out_sq = workspace + R, *factor = workspace + 2 * R;
  launch(second_moment_rows_kernel, dim3(rows, batch), dim3(kThreads), 0, stream, O, v, rows, cols,
         per_row, beta, eps, in_sq, out_sq, skip);
  launch(second_moment_factor_kernel, dim3(batch), dim3(kThreads), 0, stream, factor,
         static_cast<const double*>(in_sq), static_cast<const double*>(out_sq), rows, target_norm,
         eps);
  const std::size_t elems = static_cast<std::size_t>(rows) * cols;
  launch(scale_matrices_kernel, dim3(scale_chunks(elems), batch), dim3(kThreads), 0, stream, O,
         elems, static_cast<const double*>(factor));
}

void lerp_update(float* x, const float* y, std::size_t n, float beta, const double* skip,
                 cudaStream_t stream) {
  if (n == 0) return;
  launch(lerp_kernel, dim3(grid_for(n)), dim3(kThreads), 0, stream, x, y, n, beta, skip);
}

void soap_precondition(float* D, float* v, const float* m, const float* g, std::size_t n,
                       float beta2, float eps, const double* skip, cudaStream_t stream) {
  if (n == 0) return;
  launch(soap_precondition_kernel, dim3(grid_for(n)), dim3(kThreads), 0, stream, D, v, m, g, n,
         beta2, eps, skip);
}

std::size_t optimizer_workspace_elems() {
  return kReduceMaxBlocks;
}

AdamWParams adamw_params(double lr, double beta1, double beta2, double eps, double weight_decay,
                         std::int64_t t) {
  if (t < 1)
    throw std::invalid_argument("adamw_params: step t must be >= 1, got " + std::to_string(t));
  AdamWParams p;
  p.lr = static_cast<float>(lr);
  p.beta1 = static_cast<float>(beta1);
  p.beta2 = static_cast<float>(beta2);
  p.eps = static_cast<float>(eps);
  p.weight_decay = static_cast<float>(weight_decay);
  p.bias_correction1 = static_cast<float>(1.0 - std::pow(beta1, static_cast<double>(t)));
  p.bias_correction2 = static_cast<float>(1.0 - std::pow(beta2, static_cast<double>(t)));
  return p;
}

template <typename TW>
void adamw_update(TW* w, __nv_bfloat16* w_copy, const float* g, float grad_scale, float* m,
                  float* v, std::size_t n, const AdamWParams& p, std::uint64_t seed,
                  std::uint64_t rng_offset, const double* skip, double* workspace,
                  double* out_sumsq, bool accumulate, cudaStream_t stream) {
  if (n == 0) {
    if (out_sumsq != nullptr && !accumulate)
      MOETRAIN_CUDA_CHECK(cudaMemsetAsync(out_sumsq, 0, sizeof(double), stream));
    return;
  }
  const int blocks = grid_for(n);
  double* partials = out_sumsq != nullptr ? workspace : nullptr;
  launch(adamw_kernel<TW>, dim3(blocks), dim3(kThreads), 0, stream, w, w_copy, g, m, v, n,
         grad_scale, p, seed, rng_offset, skip, partials);
  finalize(out_sumsq, workspace, blocks, accumulate, stream);
}

template <typename T, bool kSquare>
void reduce(const T* x, std::size_t n, double* workspace, double* out, bool accumulate,
            cudaStream_t stream) {
  if (out == nullptr) return;
  if (n == 0) {
    if (!accumulate) MOETRAIN_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(double), stream));
    return;
  }
  const int blocks = grid_for(n);
  launch(sum_kernel<T, kSquare>, dim3(blocks), dim3(kThreads), 0, stream, x, n, workspace);
  finalize(out, workspace, blocks, accumulate, stream);
}

template <typename T>
void sum_squares(const T* x, std::size_t n, double* workspace, double* out, bool accumulate,
                 cudaStream_t stream) {
  reduce<T, true>(x, n, workspace, out, accumulate, stream);
}

template <typename T>
void sum(const T* x, std::size_t n, double* workspace, double* out, bool accumulate,
         cudaStream_t stream) {
  reduce<T, false>(x, n, workspace, out, accumulate, stream);
}

template <typename T>
void scale_by(T* x, std::size_t n, const double* factor, cudaStream_t stream) {
  if (n == 0) return;
  launch(scale_by_kernel<T>, dim3(grid_for(n)), dim3(kThreads), 0, stream, x, n, factor);
}

void step_gate(double* gate, const double* rank_sums, int world, int per_rank, double max_norm,
               cudaStream_t stream) {
  if (world < 1 || per_rank < 1)
    throw std::invalid_argument("step_gate: world " + std::to_string(world) + ", per_rank " +
                                std::to_string(per_rank) + " (both must be >= 1)");
  launch(step_gate_kernel, dim3(1), dim3(1), 0, stream, gate, rank_sums, world, per_rank, max_norm);
}

void qk_clip_factors(float* factors, double* clipped, const float* smax, const std::int32_t* mats,
                     const QkClipDims& s, const double* skip, cudaStream_t stream) {
  if (s.matrices <= 0) return;
  if (s.n_kv_heads <= 0 || s.n_heads % s.n_kv_heads != 0 || s.heads_ld < s.n_heads ||
      s.heads_ld < s.n_kv_heads || s.slots < 1)
    throw std::invalid_argument("qk_clip_factors: inconsistent head counts or slots");
  launch(qk_clip_factors_kernel, dim3(1), dim3(kThreads), 0, stream, factors, clipped, smax, mats,
         s, skip);
}

template <typename TU>
void muon_momentum(float* M, TU* U, const float* G, float grad_scale, std::size_t n, float mu,
                   bool nesterov, const double* skip, cudaStream_t stream) {
  if (n == 0) return;
  launch(muon_momentum_kernel<TU>, dim3(grid_for(n)), dim3(kThreads), 0, stream, M, U, G, n,
         grad_scale, mu, nesterov, skip);
}

template <typename TW, typename TO>
void muon_update(TW* w, __nv_bfloat16* w_copy, const TO* O, std::size_t n, float lr, float s,
                 float weight_decay, std::uint64_t seed, std::uint64_t rng_offset,
                 const double* skip, double* workspace, double* out_sumsq, bool accumulate,
                 cudaStream_t stream) {
  if (n == 0) {
    if (out_sumsq != nullptr && !accumulate)
      MOETRAIN_CUDA_CHECK(cudaMemsetAsync(out_sumsq, 0, sizeof(double), stream));
    return;
  }
  const int blocks = grid_for(n);
  double* partials = out_sumsq != nullptr ? workspace : nullptr;
  launch(muon_update_kernel<TW, TO>, dim3(blocks), dim3(kThreads), 0, stream, w, w_copy, O, n, lr,
         s, weight_decay, seed, rng_offset, skip, partials);
  finalize(out_sumsq, workspace, blocks, accumulate, stream);
}

std::size_t frobenius_workspace_elems(int batch, std::size_t elems) {
  return static_cast<std::size_t>(std::max(batch, 0)) * frobenius_chunks(elems);
}

template <typename TIn, typename TOut>
void frobenius_normalize(TOut* out, const TIn* in, int batch, std::size_t elems, double norm_scale,
                         double eps, double* workspace, cudaStream_t stream) {
  if (batch <= 0 || elems == 0) return;
  if (batch > 65535)
    throw std::invalid_argument("frobenius_normalize: batch " + std::to_string(batch) + " > 65535");
  const dim3 grid(frobenius_chunks(elems), batch);
  launch(frobenius_partial_kernel<TIn>, grid, dim3(kThreads), 0, stream, in, elems, workspace);
  launch(frobenius_scale_kernel<TIn, TOut>, grid, dim3(kThreads), 0, stream, out, in, elems,
         norm_scale, eps, static_cast<const double*>(workspace));
}

template <typename TW>
void scale_row_blocks(TW* w, __nv_bfloat16* w_copy, int row_blocks, std::size_t block_elems,
                      const float* factors, cudaStream_t stream) {
  if (row_blocks <= 0 || block_elems == 0) return;
  if (row_blocks > 65535)
    throw std::invalid_argument("scale_row_blocks: row_blocks " + std::to_string(row_blocks) +
                                " > 65535");
  launch(scale_row_blocks_kernel<TW>, dim3(scale_chunks(block_elems), row_blocks), dim3(kThreads),
         0, stream, w, w_copy, block_elems, factors);
}

// ---- instantiations -----------------------------------------------------------------------------
template void adamw_update<float>(float*, __nv_bfloat16*, const float*, float, float*, float*,
                                  std::size_t, const AdamWParams&, std::uint64_t, std::uint64_t,
                                  const double*, double*, double*, bool, cudaStream_t);
template void adamw_update<__nv_bfloat16>(__nv_bfloat16*, __nv_bfloat16*, const float*, float,
                                          float*, float*, std::size_t, const AdamWParams&,
                                          std::uint64_t, std::uint64_t, const double*, double*,
                                          double*, bool, cudaStream_t);
template void sum_squares<float>(const float*, std::size_t, double*, double*, bool, cudaStream_t);
template void sum_squares<__nv_bfloat16>(const __nv_bfloat16*, std::size_t, double*, double*, bool,
                                         cudaStream_t);
template void sum<float>(const float*, std::size_t, double*, double*, bool, cudaStream_t);
template void scale_by<float>(float*, std::size_t, const double*, cudaStream_t);
template void scale_by<__nv_bfloat16>(__nv_bfloat16*, std::size_t, const double*, cudaStream_t);
template void muon_momentum<float>(float*, float*, const float*, float, std::size_t, float, bool,
                                   const double*, cudaStream_t);
template void muon_momentum<__nv_bfloat16>(float*, __nv_bfloat16*, const float*, float, std::size_t,
                                           float, bool, const double*, cudaStream_t);
#define MOETRAIN_MUON_UPDATE(TW, TO)                                                             \
  template void muon_update<TW, TO>(TW*, __nv_bfloat16*, const TO*, std::size_t, float, float,   \
                                    float, std::uint64_t, std::uint64_t, const double*, double*, \
                                    double*, bool, cudaStream_t);
MOETRAIN_MUON_UPDATE(float, float)
MOETRAIN_MUON_UPDATE(float, __nv_bfloat16)
MOETRAIN_MUON_UPDATE(__nv_bfloat16, float)
MOETRAIN_MUON_UPDATE(__nv_bfloat16, __nv_bfloat16)
#undef MOETRAIN_MUON_UPDATE
#define MOETRAIN_FROBENIUS(TI, TO)                                                            \
  template void frobenius_normalize<TI, TO>(TO*, const TI*, int, std::size_t, double, double, \
                                            double*, cudaStream_t);
MOETRAIN_FROBENIUS(float, float)
MOETRAIN_FROBENIUS(float, __nv_bfloat16)
MOETRAIN_FROBENIUS(__nv_bfloat16, __nv_bfloat16)
#undef MOETRAIN_FROBENIUS
template void scale_row_blocks<float>(float*, __nv_bfloat16*, int, std::size_t, const float*,
                                      cudaStream_t);
template void scale_row_blocks<__nv_bfloat16>(__nv_bfloat16*, __nv_bfloat16*, int, std::size_t,
                                              const float*, cudaStream_t);

}  // namespace moetrain::kernels
