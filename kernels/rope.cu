// kernels/rope.cu — half-split RoPE, forward and backward (inverse rotation), in place. See
// rope.cuh.
//
// One thread per (row, head, pack of V consecutive i < hd/2): it loads the V elements at i and at
// i + hd/2 (16-byte packs when the layout allows) and the matching cos/sin (tables stay
// L2-resident: seq * hd/2 entries), rotates in fp32 and stores both packs back. 2D grid: x over the
// (head, pack) items of a row, y over rows with a grid-stride loop. Pure streaming: read and write
// q and k once.
#include "pack.cuh"
#include "rope.cuh"

namespace moetrain::kernels {
namespace rope_detail {

constexpr int kThreads = 256;
constexpr int kDefaultMaxRowBlocks = 8192;  // grid.y cap (CUDA allows 65535)

template <typename T, typename TC, int V>
__global__ void __launch_bounds__(kThreads)
    rope_kernel(T* __restrict__ x, int ld, int rows, int seq, int n_heads, int half,
                const TC* __restrict__ cos, const TC* __restrict__ sin, float sign) {
  const int per_head = half / V;
  const int item = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (item >= n_heads * per_head) return;
  const int h = item / per_head, i = (item - h * per_head) * V;
  for (int r = static_cast<int>(blockIdx.y * blockDim.y + threadIdx.y); r < rows;
       r += static_cast<int>(gridDim.y * blockDim.y)) {
    const std::size_t t = static_cast<std::size_t>(r % seq) * half + i;
    T* v = x + static_cast<std::size_t>(r) * ld + static_cast<std::size_t>(h) * 2 * half + i;
    float a[V], b[V], c[V], s[V];
    load(v, a);
    load(v + half, b);
    load(cos + t, c);
    load(sin + t, s);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float sn = sign * s[k], ak = a[k];
      a[k] = ak * c[k] - b[k] * sn;
      b[k] = b[k] * c[k] + ak * sn;
    }
    store(v, a);
    store(v + half, b);
  }
}

template <typename T, typename TC>
void rotate(T* x, int ld, int rows, int seq, int n_heads, int head_dim, const TC* cos,
            const TC* sin, float sign, cudaStream_t stream, int max_blocks) {
  if (rows <= 0 || n_heads <= 0 || head_dim <= 0) return;
  if (head_dim % 2 != 0) throw std::invalid_argument("rope: head_dim must be even");
  if (seq <= 0) throw std::invalid_argument("rope: seq must be positive");
  if (ld < n_heads * head_dim)
    throw std::invalid_argument("rope: ld smaller than n_heads * head_dim");
  const int half = head_dim / 2;
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = half % kVec == 0 && ld % kVec == 0 && aligned(x, 16) &&
                   aligned(cos, sizeof(TC) * kVec) && aligned(sin, sizeof(TC) * kVec);
  const int items = n_heads * (vec ? half / kVec : half);
  int bx = ((items + kWarpSize - 1) / kWarpSize) * kWarpSize;
  if (bx > kThreads) bx = kThreads;
  const int by = kThreads / bx;
  const long long cap = max_blocks > 0 ? max_blocks : kDefaultMaxRowBlocks;
  long long gy = (static_cast<long long>(rows) + by - 1) / by;
  if (gy > cap) gy = cap;
  const dim3 grid(static_cast<unsigned>((items + bx - 1) / bx), static_cast<unsigned>(gy));
  const dim3 block(static_cast<unsigned>(bx), static_cast<unsigned>(by));
  if (vec) {
    launch(rope_kernel<T, TC, kVec>, grid, block, 0, stream, x, ld, rows, seq, n_heads, half, cos,
           sin, sign);
  } else {
    launch(rope_kernel<T, TC, 1>, grid, block, 0, stream, x, ld, rows, seq, n_heads, half, cos, sin,
           sign);
  }
}

}  // namespace rope_detail

template <typename T, typename TC>
void rope_forward(T* x, int ld, int rows, int seq, int n_heads, int head_dim, const TC* cos,
                  const TC* sin, cudaStream_t stream, int max_blocks) {
  rope_detail::rotate(x, ld, rows, seq, n_heads, head_dim, cos, sin, 1.0f, stream, max_blocks);
}

template <typename T, typename TC>
void rope_backward(T* dx, int ld, int rows, int seq, int n_heads, int head_dim, const TC* cos,
                   const TC* sin, cudaStream_t stream, int max_blocks) {
  rope_detail::rotate(dx, ld, rows, seq, n_heads, head_dim, cos, sin, -1.0f, stream, max_blocks);
}

#define MOETRAIN_ROPE_INSTANTIATE(T, TC)                                                \
  template void rope_forward<T, TC>(T*, int, int, int, int, int, const TC*, const TC*,  \
                                    cudaStream_t, int);                                 \
  template void rope_backward<T, TC>(T*, int, int, int, int, int, const TC*, const TC*, \
                                     cudaStream_t, int);
MOETRAIN_ROPE_INSTANTIATE(float, float)
MOETRAIN_ROPE_INSTANTIATE(__nv_bfloat16, __nv_bfloat16)
MOETRAIN_ROPE_INSTANTIATE(__nv_bfloat16, float)
#undef MOETRAIN_ROPE_INSTANTIATE

}  // namespace moetrain::kernels
