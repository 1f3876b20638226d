// kernels/swiglu.cu — SwiGLU forward and backward. See swiglu.cuh.
//
// Elementwise and bandwidth-bound: one thread per pack of V consecutive columns (16-byte packs when
// ff and the pointers allow) of one row; 2D grid: x over the column packs of a row, y over rows
// (block rows cover several short rows at once), grid-stride over the rest. No index division.
// Forward reads h once (2 ff per row) and writes out once (ff); backward reads h and dout, writes
// dh.
#include "pack.cuh"
#include "swiglu.cuh"

namespace moetrain::kernels {
namespace swiglu_detail {

constexpr int kThreads = 256;
constexpr int kDefaultMaxRowBlocks = 16384;  // grid.y cap (CUDA allows 65535)

__device__ __forceinline__ float sigmoid(float a) {
  return 1.0f / (1.0f + expf(-a));
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    swiglu_forward_kernel(T* __restrict__ out, const T* __restrict__ h, int rows, int ff) {
  const int c = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (c >= ff) return;
  for (int r = static_cast<int>(blockIdx.y * blockDim.y + threadIdx.y); r < rows;
       r += static_cast<int>(gridDim.y * blockDim.y)) {
    const T* a_row = h + static_cast<std::size_t>(r) * 2 * ff;
    float a[V], b[V];
    load(a_row + c, a);
    load(a_row + ff + c, b);
#pragma unroll
    for (int k = 0; k < V; ++k) a[k] = a[k] * sigmoid(a[k]) * b[k];
    store(out + static_cast<std::size_t>(r) * ff + c, a);
  }
}

// dh may alias h: no __restrict__ on either.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    swiglu_backward_kernel(T* dh, const T* __restrict__ dout, const T* h, int rows, int ff) {
  const int c = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (c >= ff) return;
  for (int r = static_cast<int>(blockIdx.y * blockDim.y + threadIdx.y); r < rows;
       r += static_cast<int>(gridDim.y * blockDim.y)) {
    const std::size_t off = static_cast<std::size_t>(r) * 2 * ff + c;
    float a[V], b[V], g[V];
    load(h + off, a);
    load(h + off + ff, b);
    load(dout + static_cast<std::size_t>(r) * ff + c, g);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float sig = sigmoid(a[k]), silu = a[k] * sig;
      const float da = g[k] * b[k] * sig * (1.0f + a[k] * (1.0f - sig));
      b[k] = g[k] * silu;
      a[k] = da;
    }
    store(dh + off, a);
    store(dh + off + ff, b);
  }
}

// Block: x covers the column packs of a row (at most kThreads), y as many rows as fill kThreads.
inline void geometry(int rows, int packs, int max_blocks, dim3& grid, dim3& block) {
  int bx = ((packs + kWarpSize - 1) / kWarpSize) * kWarpSize;
  if (bx > kThreads) bx = kThreads;
  const int by = kThreads / bx;
  const long long cap = max_blocks > 0 ? max_blocks : kDefaultMaxRowBlocks;
  long long gy = (static_cast<long long>(rows) + by - 1) / by;
  if (gy > cap) gy = cap;
  grid = dim3(static_cast<unsigned>((packs + bx - 1) / bx), static_cast<unsigned>(gy));
  block = dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by));
}

}  // namespace swiglu_detail

template <typename T>
void swiglu_forward(T* out, const T* h, int rows, int ff, cudaStream_t stream, int max_blocks) {
  using namespace swiglu_detail;
  if (rows <= 0 || ff <= 0) return;
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = ff % kVec == 0 && aligned(out, 16) && aligned(h, 16);
  dim3 grid, block;
  geometry(rows, vec ? ff / kVec : ff, max_blocks, grid, block);
  if (vec) {
    launch(swiglu_forward_kernel<T, kVec>, grid, block, 0, stream, out, h, rows, ff);
  } else {
    launch(swiglu_forward_kernel<T, 1>, grid, block, 0, stream, out, h, rows, ff);
  }
}

template <typename T>
void swiglu_backward(T* dh, const T* dout, const T* h, int rows, int ff, cudaStream_t stream,
                     int max_blocks) {
  using namespace swiglu_detail;
  if (rows <= 0 || ff <= 0) return;
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = ff % kVec == 0 && aligned(dh, 16) && aligned(dout, 16) && aligned(h, 16);
  dim3 grid, block;
  geometry(rows, vec ? ff / kVec : ff, max_blocks, grid, block);
  if (vec) {
    launch(swiglu_backward_kernel<T, kVec>, grid, block, 0, stream, dh, dout, h, rows, ff);
  } else {
    launch(swiglu_backward_kernel<T, 1>, grid, block, 0, stream, dh, dout, h, rows, ff);
  }
}

template void swiglu_forward<float>(float*, const float*, int, int, cudaStream_t, int);
template void swiglu_forward<__nv_bfloat16>(__nv_bfloat16*, const __nv_bfloat16*, int, int,
                                            cudaStream_t, int);
template void swiglu_backward<float>(float*, const float*, const float*, int, int, cudaStream_t,
                                     int);
template void swiglu_backward<__nv_bfloat16>(__nv_bfloat16*, const __nv_bfloat16*,
                                             const __nv_bfloat16*, int, int, cudaStream_t, int);

}  // namespace moetrain::kernels
