// kernels/rmsnorm.cu — RMSNorm forward and backward. See rmsnorm.cuh.
//
// forward:  one warp per row (grid-stride over rows). Pass 1 reads x in 16-byte packs and
//           accumulates sum(x^2) in fp32; a warp butterfly gives rstd; pass 2 re-reads the row
//           (L1/L2-resident) and writes y. DRAM traffic is the minimum: read x, gain (cached);
//           write y, rstd.
// backward: one warp per row. Pass 1: sum(dy * g * x) (warp butterfly); pass 2: dx += ..., and each
//           lane adds dy * xhat for the columns it owns into its warp's private fp32 row of dgain
//           partials in shared memory, stored lane-fastest so the warp's accesses are free of bank
//           conflicts (no two threads touch one element: no atomics, no races).
//           At the end the block adds its warps' rows in warp order and writes one partial row per
//           block; a second kernel adds those rows in block order into dgain.
#include "pack.cuh"
#include "rmsnorm.cuh"

namespace moetrain::kernels {
namespace rmsnorm_detail {

constexpr int kThreads = 256;  // forward: 8 warps = 8 rows at a time
constexpr int kDefaultMaxBlocks = 4096;
constexpr int kBackwardDefaultMaxBlocks = 264;  // 2 per H100 SM: the dgain partials stay small
constexpr int kMaxWarpsBackward = 8;
constexpr std::size_t kSmemBudget = 48 * 1024;  // backward partials per block, without opt-in
constexpr std::size_t kSmemMax = 160 * 1024;    // with opt-in (sm_80 allows 163 KiB)

inline unsigned grid_for(long long work_items, int per_block, int cap) {
  long long blocks = (work_items + per_block - 1) / per_block;
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks);
}

// Floats of a warp's dgain partial row: d rounded up to whole rounds of 32 lanes x V columns (the
// row is stored lane-fastest, see rmsnorm_backward_kernel).
inline std::size_t partial_row_floats(int d, int vec) {
  const std::size_t round = static_cast<std::size_t>(kWarpSize) * vec;
  return (static_cast<std::size_t>(d) + round - 1) / round * round;
}

// Warps per backward block: as many per-warp partial rows as fit the shared-memory budget (sized
// for the largest pack width, so the count does not depend on the pointers' alignment).
inline int backward_warps(int d) {
  const std::size_t row_bytes = partial_row_floats(d, 8) * sizeof(float);
  if (row_bytes > kSmemMax)
    throw std::invalid_argument("rmsnorm_backward: d too large for shared memory");
  std::size_t w = kSmemBudget / row_bytes;
  if (w > kMaxWarpsBackward) w = kMaxWarpsBackward;
  if (w < 1) w = 1;
  return static_cast<int>(w);
}

inline unsigned backward_blocks(int n, int d, int max_blocks) {
  return grid_for(n, backward_warps(d), max_blocks > 0 ? max_blocks : kBackwardDefaultMaxBlocks);
}

// ---- forward ------------------------------------------------------------------------------------
template <typename T, typename TG, int V>
__global__ void __launch_bounds__(kThreads)
    rmsnorm_forward_kernel(T* __restrict__ y, float* __restrict__ rstd, const T* __restrict__ x,
                           const TG* __restrict__ gain, int n, int d, float eps) {
  const int packs = d / V, lane = static_cast<int>(lane_id());
  const int warps = static_cast<int>(block_threads()) / kWarpSize;
  for (int row = static_cast<int>(blockIdx.x) * warps + static_cast<int>(warp_id()); row < n;
       row += static_cast<int>(gridDim.x) * warps) {
    const std::size_t off = static_cast<std::size_t>(row) * d;
    float ss = 0.0f;
    for (int c = lane; c < packs; c += kWarpSize) {
      float a[V];
      load(x + off + c * V, a);
#pragma unroll
      for (int k = 0; k < V; ++k) ss += a[k] * a[k];
    }
    const float r = rsqrtf(warp_sum(ss) / static_cast<float>(d) + eps);
    if (lane == 0) rstd[row] = r;
    for (int c = lane; c < packs; c += kWarpSize) {
      float a[V], g[V];
      load(x + off + c * V, a);
      load(gain + c * V, g);
#pragma unroll
      for (int k = 0; k < V; ++k) a[k] = a[k] * r * g[k];
      store(y + off + c * V, a);
    }
  }
}

// ---- backward -----------------------------------------------------------------------------------
template <typename T, typename TG, int V>
__global__ void __launch_bounds__(kMaxWarpsBackward* kWarpSize)
    rmsnorm_backward_kernel(T* __restrict__ dx, float* __restrict__ partial,
                            const T* __restrict__ dy, const T* __restrict__ x,
                            const TG* __restrict__ gain, const float* __restrict__ rstd, int n,
                            int d) {
  const int packs = d / V, lane = static_cast<int>(lane_id()), warp = static_cast<int>(warp_id());
  const int warps = static_cast<int>(block_threads()) / kWarpSize;
  // This warp's dgain partials, lane-fastest: column k of the lane's j-th pack (pack lane + 32 j)
  // at acc[(j * V + k) * 32] — consecutive lanes hit consecutive banks (no conflicts).
  const int rounds = (packs + kWarpSize - 1) / kWarpSize;
  const std::size_t row_floats = static_cast<std::size_t>(rounds) * V * kWarpSize;
  float* acc = dynamic_smem<float>() + warp * row_floats + lane;
  for (int j = 0; j < rounds * V; ++j) acc[j * kWarpSize] = 0.0f;
  const float inv_d = 1.0f / static_cast<float>(d);
  for (int row = static_cast<int>(blockIdx.x) * warps + warp; row < n;
       row += static_cast<int>(gridDim.x) * warps) {
    const std::size_t off = static_cast<std::size_t>(row) * d;
    const float r = rstd[row];
    float dot = 0.0f;
    for (int c = lane; c < packs; c += kWarpSize) {
      float g[V], a[V], xv[V];
      load(dy + off + c * V, g);
      load(gain + c * V, a);
      load(x + off + c * V, xv);
#pragma unroll
      for (int k = 0; k < V; ++k) dot += g[k] * a[k] * xv[k];
    }
    const float m = warp_sum(dot) * r * inv_d;  // mean(gh * xhat)
    for (int c = lane, j = 0; c < packs; c += kWarpSize, ++j) {
      float g[V], a[V], xv[V], o[V];
      load(dy + off + c * V, g);
      load(gain + c * V, a);
      load(x + off + c * V, xv);
      load(dx + off + c * V, o);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float xhat = xv[k] * r;
        o[k] += r * (g[k] * a[k] - xhat * m);
        acc[(j * V + k) * kWarpSize] += g[k] * xhat;
      }
      store(dx + off + c * V, o);
    }
  }
  __syncthreads();
  const float* rows = dynamic_smem<float>();
  for (int col = static_cast<int>(thread_rank()); col < d;
       col += static_cast<int>(block_threads())) {
    const int c = col / V, k = col - c * V;
    const std::size_t slot =
        static_cast<std::size_t>((c / kWarpSize) * V + k) * kWarpSize + c % kWarpSize;
    float s = 0.0f;
    for (int w = 0; w < warps; ++w) s += rows[w * row_floats + slot];
    partial[static_cast<std::size_t>(blockIdx.x) * d + col] = s;
  }
}

// dgain[c] += sum over b < blocks of partial[b, c], in block order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    rmsnorm_dgain_kernel(T* __restrict__ dgain, const float* __restrict__ partial, int blocks,
                         int d) {
  for (int c = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x); c < d;
       c += static_cast<int>(gridDim.x * blockDim.x)) {
    float s = 0.0f;
    for (int b = 0; b < blocks; ++b) s += partial[static_cast<std::size_t>(b) * d + c];
    dgain[c] = from_float<T>(to_float(dgain[c]) + s);
  }
}

}  // namespace rmsnorm_detail

template <typename T, typename TG>
void rmsnorm_forward(T* y, float* rstd, const T* x, const TG* gain, int n, int d, float eps,
                     cudaStream_t stream, int max_blocks) {
  using namespace rmsnorm_detail;
  if (n <= 0 || d <= 0) return;
  constexpr int kVec = 16 / sizeof(T);
  const dim3 grid(
      grid_for(n, kThreads / kWarpSize, max_blocks > 0 ? max_blocks : kDefaultMaxBlocks));
  const bool vec =
      d % kVec == 0 && aligned(y, 16) && aligned(x, 16) && aligned(gain, sizeof(TG) * kVec);
  if (vec)
    launch(rmsnorm_forward_kernel<T, TG, kVec>, grid, dim3(kThreads), 0, stream, y, rstd, x, gain,
           n, d, eps);
  else
    launch(rmsnorm_forward_kernel<T, TG, 1>, grid, dim3(kThreads), 0, stream, y, rstd, x, gain, n,
           d, eps);
}

std::size_t rmsnorm_backward_workspace_bytes(int n, int d, int max_blocks) {
  if (n <= 0 || d <= 0) return 0;
  return static_cast<std::size_t>(rmsnorm_detail::backward_blocks(n, d, max_blocks)) * d *
         sizeof(float);
}

template <typename T, typename TG>
void rmsnorm_backward(T* dx, TG* dgain, const T* dy, const T* x, const TG* gain, const float* rstd,
                      int n, int d, void* workspace, cudaStream_t stream, int max_blocks) {
  using namespace rmsnorm_detail;
  if (n <= 0 || d <= 0) return;
  constexpr int kVec = 16 / sizeof(T);
  float* partial = static_cast<float*>(workspace);
  const int warps = backward_warps(d);
  const unsigned blocks = backward_blocks(n, d, max_blocks);
  const bool vec = d % kVec == 0 && aligned(dx, 16) && aligned(dy, 16) && aligned(x, 16) &&
                   aligned(gain, sizeof(TG) * kVec);
  const std::size_t smem = warps * partial_row_floats(d, vec ? kVec : 1) * sizeof(float);
  if (vec) {
    launch(rmsnorm_backward_kernel<T, TG, kVec>, dim3(blocks), dim3(warps * kWarpSize), smem,
           stream, dx, partial, dy, x, gain, rstd, n, d);
  } else {
    launch(rmsnorm_backward_kernel<T, TG, 1>, dim3(blocks), dim3(warps * kWarpSize), smem, stream,
           dx, partial, dy, x, gain, rstd, n, d);
  }
  launch(rmsnorm_dgain_kernel<TG>, dim3(grid_for(d, kThreads, kDefaultMaxBlocks)), dim3(kThreads),
         0, stream, dgain, partial, static_cast<int>(blocks), d);
}

#define MOETRAIN_RMSNORM_INSTANTIATE(T, TG)                                                        \
  template void rmsnorm_forward<T, TG>(T*, float*, const T*, const TG*, int, int, float,           \
                                       cudaStream_t, int);                                         \
  template void rmsnorm_backward<T, TG>(T*, TG*, const T*, const T*, const TG*, const float*, int, \
                                        int, void*, cudaStream_t, int);
MOETRAIN_RMSNORM_INSTANTIATE(float, float)
MOETRAIN_RMSNORM_INSTANTIATE(__nv_bfloat16, __nv_bfloat16)
MOETRAIN_RMSNORM_INSTANTIATE(__nv_bfloat16, float)  // bf16 activations, fp32 master gains
#undef MOETRAIN_RMSNORM_INSTANTIATE

}  // namespace moetrain::kernels
