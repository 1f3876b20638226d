// kernels/cross_entropy.cu — fused softmax cross-entropy forward + backward. See cross_entropy.cuh.
//
// One block per row (grid-stride over rows). Pass 1 streams the row once in 16-byte packs; each
// thread keeps an online (max, sum of exp(x - max)) over its packs (rescaling its sum only when a
// pack raises its max); block_max then block_sum (common.cuh: fixed order, deterministic) combine
// the threads' pairs into the row's logsumexp. The target logit is read before the reductions'
// barriers, so no thread has overwritten it yet. Pass 2 (with a grad_scale) re-reads the row —
// 64 KiB in bf16 at vocab 32768, still in L2 — and writes grad_scale * (softmax - onehot) over it.
#include "cross_entropy.cuh"
#include "pack.cuh"

namespace moetrain::kernels {
namespace cross_entropy_detail {

constexpr int kMaxThreads = 1024;
constexpr int kDefaultMaxBlocks = 32768;

template <typename T, int V>
__global__ void __launch_bounds__(kMaxThreads)
    cross_entropy_kernel(float* __restrict__ losses, T* __restrict__ logits,
                         const int32_t* __restrict__ targets, int n, int vocab,
                         const float* __restrict__ grad_scale_ptr) {
  const bool grad = grad_scale_ptr != nullptr;
  const float grad_scale = grad ? *grad_scale_ptr : 0.0f;
  const int packs = vocab / V;
  const int tid = static_cast<int>(thread_rank()), nt = static_cast<int>(block_threads());
  for (int row = static_cast<int>(blockIdx.x); row < n; row += static_cast<int>(gridDim.x)) {
    T* x = logits + static_cast<std::size_t>(row) * vocab;
    const int y = targets[row];  // the same for the whole block: every thread takes the same branch
    if (y < 0 || y >= vocab) {
      const float fill = y < 0 ? 0.0f : NAN;
      if (tid == 0) losses[row] = fill;
      if (grad) {
        float f[V];
#pragma unroll
        for (int k = 0; k < V; ++k) f[k] = fill;
        for (int p = tid; p < packs; p += nt) store(x + p * V, f);
      }
      continue;
    }
    float m = -INFINITY, s = 0.0f;
    for (int p = tid; p < packs; p += nt) {
      float a[V];
      load(x + p * V, a);
      float pm = a[0];
#pragma unroll
      for (int k = 1; k < V; ++k) pm = fmaxf(pm, a[k]);
      if (pm > m) {
        s *= expf(m - pm);  // m = -inf the first time: exp(-inf) = 0
        m = pm;
      }
#pragma unroll
      for (int k = 0; k < V; ++k) s += expf(a[k] - m);
    }
    const float xt = to_float(x[y]);  // before the barriers below: nobody has overwritten it yet
    const float row_max = block_max(m);
    const float row_sum = block_sum(m == -INFINITY ? 0.0f : s * expf(m - row_max));
    if (tid == 0) losses[row] = row_max + logf(row_sum) - xt;
    if (grad) {
      const float scale = grad_scale / row_sum;
      for (int p = tid; p < packs; p += nt) {
        float a[V];
        load(x + p * V, a);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          a[k] = expf(a[k] - row_max) * scale;
          if (p * V + k == y) a[k] -= grad_scale;
        }
        store(x + p * V, a);
      }
    }
  }
}

}  // namespace cross_entropy_detail

template <typename T>
void cross_entropy(float* losses, T* logits, const int32_t* targets, int n, int vocab,
                   const float* grad_scale, cudaStream_t stream, int max_blocks) {
  using namespace cross_entropy_detail;
  if (n <= 0) return;
  if (vocab <= 0) throw std::invalid_argument("cross_entropy: vocab must be positive");
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = vocab % kVec == 0 && aligned(logits, 16);
  const int packs = vec ? vocab / kVec : vocab;
  // About 4 packs per thread, 32 to 1024 threads (vocab 32768 in bf16: 1024 threads, 4 packs each).
  int threads = ((packs + 4 * kWarpSize - 1) / (4 * kWarpSize)) * kWarpSize;
  if (threads < kWarpSize) threads = kWarpSize;
  if (threads > kMaxThreads) threads = kMaxThreads;
  const long long cap = max_blocks > 0 ? max_blocks : kDefaultMaxBlocks;
  const dim3 grid(static_cast<unsigned>(n < cap ? n : cap));
  if (vec) {
    launch(cross_entropy_kernel<T, kVec>, grid, dim3(threads), 0, stream, losses, logits, targets,
           n, vocab, grad_scale);
  } else {
    launch(cross_entropy_kernel<T, 1>, grid, dim3(threads), 0, stream, losses, logits, targets, n,
           vocab, grad_scale);
  }
}

template void cross_entropy<float>(float*, float*, const int32_t*, int, int, const float*,
                                   cudaStream_t, int);
template void cross_entropy<__nv_bfloat16>(float*, __nv_bfloat16*, const int32_t*, int, int,
                                           const float*, cudaStream_t, int);

}  // namespace moetrain::kernels
