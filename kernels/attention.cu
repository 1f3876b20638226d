// kernels/attention.cu — causal softmax forward and backward of unfused attention. See
// attention.cuh.
//
// One warp per row, 8 rows per block, grid-stride over the batch x heads x seq rows. Neighbouring
// rows have nearly the same causal length, so the warps of a block finish together. Lane l owns the
// columns j = l + 32 k in every pass, so a row can be rewritten in place (P over S, dS over dP)
// without any lane reading another lane's column.
//   forward:  pass 1 keeps a running max m and sum of exp(x - m) per lane (online softmax: one read
//             of the row for both statistics), merged with two warp butterflies; pass 2 writes the
//             whole row (zeros above the diagonal). Per-row maxima go to the workspace and a second
//             kernel reduces them per head: no atomics, so smax is deterministic.
//   backward: pass 1 is the warp sum of P dP, pass 2 writes dS.
// Traffic: read S (the re-read in pass 2 mostly hits L1/L2) and write P; read P, dP, write dS.
#include "attention.cuh"

#include <algorithm>

namespace moetrain::kernels {
namespace attention_detail {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / kWarpSize;
constexpr long long kMaxBlocks = 65536;  // beyond that the grid-stride loop takes over
constexpr int kMaxHeadBlocks = 65535;

inline unsigned row_blocks(long long rows) {
  return static_cast<unsigned>(
      std::min(ceil_div(rows, static_cast<long long>(kRowsPerBlock)), kMaxBlocks));
}

// No __restrict__ on P and S: they may alias.
__global__ void __launch_bounds__(kThreads)
    causal_softmax_forward_kernel(float* P, float* __restrict__ row_max, const float* S,
                                  long long rows, int seq) {
  const int lane = static_cast<int>(lane_id());
  const long long stride = static_cast<long long>(gridDim.x) * kRowsPerBlock;
  for (long long row = static_cast<long long>(blockIdx.x) * kRowsPerBlock + warp_id(); row < rows;
       row += stride) {
    const int i = static_cast<int>(row % seq);
    const float* s = S + row * seq;
    float m = -INFINITY, sum = 0.0f;
    for (int j = lane; j <= i; j += kWarpSize) {
      const float x = s[j];
      if (x > m) {
        sum = sum * expf(m - x) + 1.0f;
        m = x;
      } else {
        sum += expf(x - m);
      }
    }
    const float mx = warp_max(m);
    const float inv = 1.0f / warp_sum(sum * expf(m - mx));  // a lane without columns adds 0 * 0
    float* p = P + row * seq;
    for (int j = lane; j < seq; j += kWarpSize) p[j] = j <= i ? expf(s[j] - mx) * inv : 0.0f;
    if (lane == 0) row_max[row] = mx;
  }
}

// smax[h] = max over b and i of row_max[b, h, i], one block per head.
__global__ void __launch_bounds__(kThreads)
    head_max_kernel(float* __restrict__ smax, const float* __restrict__ row_max, int batch,
                    int heads, int seq) {
  for (int h = static_cast<int>(blockIdx.x); h < heads; h += static_cast<int>(gridDim.x)) {
    float m = -INFINITY;
    for (int b = 0; b < batch; ++b) {
      const float* r = row_max + (static_cast<std::size_t>(b) * heads + h) * seq;
      for (int i = static_cast<int>(threadIdx.x); i < seq; i += static_cast<int>(blockDim.x))
        m = fmaxf(m, r[i]);
    }
    m = block_max(m);
    if (threadIdx.x == 0) smax[h] = m;
  }
}

// No __restrict__ on dS and dP: they may alias.
__global__ void __launch_bounds__(kThreads)
    causal_softmax_backward_kernel(float* dS, const float* dP, const float* __restrict__ P,
                                   long long rows, int seq) {
  const int lane = static_cast<int>(lane_id());
  const long long stride = static_cast<long long>(gridDim.x) * kRowsPerBlock;
  for (long long row = static_cast<long long>(blockIdx.x) * kRowsPerBlock + warp_id(); row < rows;
       row += stride) {
    const int i = static_cast<int>(row % seq);
    const float* p = P + row * seq;
    const float* dp = dP + row * seq;
    float dot = 0.0f;
    for (int j = lane; j <= i; j += kWarpSize) dot += p[j] * dp[j];
    dot = warp_sum(dot);
    float* ds = dS + row * seq;
    for (int j = lane; j < seq; j += kWarpSize) ds[j] = j <= i ? p[j] * (dp[j] - dot) : 0.0f;
  }
}

}  // namespace attention_detail

std::size_t causal_softmax_workspace_bytes(int batch, int heads, int seq) {
  if (batch <= 0 || heads <= 0 || seq <= 0) return 0;
  return static_cast<std::size_t>(batch) * heads * seq * sizeof(float);
}

void causal_softmax_forward(float* P, float* smax, const float* S, int batch, int heads, int seq,
                            void* workspace, cudaStream_t stream) {
  using namespace attention_detail;
  if (batch <= 0 || heads <= 0 || seq <= 0) return;
  const long long rows = static_cast<long long>(batch) * heads * seq;
  float* row_max = static_cast<float*>(workspace);
  launch(causal_softmax_forward_kernel, dim3(row_blocks(rows)), dim3(kThreads), 0, stream, P,
         row_max, S, rows, seq);
  launch(head_max_kernel, dim3(static_cast<unsigned>(std::min(heads, kMaxHeadBlocks))),
         dim3(kThreads), 0, stream, smax, static_cast<const float*>(row_max), batch, heads, seq);
}

void causal_softmax_backward(float* dS, const float* dP, const float* P, int batch, int heads,
                             int seq, cudaStream_t stream) {
  using namespace attention_detail;
  if (batch <= 0 || heads <= 0 || seq <= 0) return;
  const long long rows = static_cast<long long>(batch) * heads * seq;
  launch(causal_softmax_backward_kernel, dim3(row_blocks(rows)), dim3(kThreads), 0, stream, dS, dP,
         P, rows, seq);
}

}  // namespace moetrain::kernels
