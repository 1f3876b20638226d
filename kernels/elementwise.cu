// kernels/elementwise.cu — elementwise ops and precision conversions. See
// elementwise.cuh.
//
// All bandwidth-bound. The 1D ops share one grid-stride kernel that gives each thread 16-byte packs
// (when every pointer allows) and then the few leftover elements; an op is a small functor whose
// apply<V>(i) handles elements [i, i + V).
#include "elementwise.cuh"
#include "pack.cuh"

#include <algorithm>

namespace moetrain::kernels {
namespace elementwise_detail {

constexpr int kThreads = 256;
constexpr std::size_t kMaxBlocks = 65536;  // beyond that the grid-stride loops take over
constexpr unsigned kMaxGridYZ = 65535;     // CUDA's limit on grid.y and grid.z

// ---- 1D ops -------------------------------------------------------------------------------------
// out = a x + b y. With a = b = 1 it is exactly x + y (even when contracted to an fma). No
// __restrict__: out may alias x or y, and every element is read before it is written, by one
// thread.
template <typename T>
struct Axpby {
  T* out;
  const T* x;
  const T* y;
  float a, b;
  template <int V>
  __device__ __forceinline__ void apply(std::size_t i) const {
    float u[V], w[V];
    load(x + i, u);
    load(y + i, w);
#pragma unroll
    for (int k = 0; k < V; ++k) u[k] = a * u[k] + b * w[k];
    store(out + i, u);
  }
};

template <typename T>
struct Scale {
  T* x;
  float s;
  template <int V>
  __device__ __forceinline__ void apply(std::size_t i) const {
    float u[V];
    load(x + i, u);
#pragma unroll
    for (int k = 0; k < V; ++k) u[k] *= s;
    store(x + i, u);
  }
};

// The random bits depend on the element index only, so the rounding does not depend on the pack
// width or the grid.
struct ToBf16Stochastic {
  __nv_bfloat16* out;
  const float* in;
  std::uint64_t seed;
  template <int V>
  __device__ __forceinline__ void apply(std::size_t i) const {
    float u[V];
    load(in + i, u);
    Pack<__nv_bfloat16, V> pk;
#pragma unroll
    for (int k = 0; k < V; ++k) pk.v[k] = float_to_bf16_stochastic(u[k], random_u32(seed, i + k));
    *reinterpret_cast<Pack<__nv_bfloat16, V>*>(out + i) = pk;
  }
};

struct FromBf16 {
  float* out;
  const __nv_bfloat16* in;
  template <int V>
  __device__ __forceinline__ void apply(std::size_t i) const {
    float u[V];
    load(in + i, u);
    store(out + i, u);
  }
};

// Whole packs first, then the n % V leftover elements, one per thread.
template <int V, typename Op>
__global__ void __launch_bounds__(kThreads) map_kernel(Op op, std::size_t n) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  const std::size_t t = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::size_t packs = n / V;
  for (std::size_t p = t; p < packs; p += stride) op.template apply<V>(p * V);
  for (std::size_t i = packs * V + t; i < n; i += stride) op.template apply<1>(i);
}

// vec: every pointer of op is aligned for V-element packs.
template <int V, typename Op>
void map(const Op& op, std::size_t n, bool vec, cudaStream_t stream) {
  if (n == 0) return;
  const std::size_t items = vec ? (n + V - 1) / V : n;
  const std::size_t blocks = std::min(ceil_div(items, std::size_t{kThreads}), kMaxBlocks);
  const dim3 grid(static_cast<unsigned>(blocks)), block(kThreads);
  if (vec) {
    launch(map_kernel<V, Op>, grid, block, 0, stream, op, n);
  } else {
    launch(map_kernel<1, Op>, grid, block, 0, stream, op, n);
  }
}

// ---- strided scale
// ------------------------------------------------------------------------------- x[r, c] *= s over
// a strided [rows, cols] matrix, one thread per element of a row; s = 0 writes zeros without
// reading (a GEMM's beta = 0: whatever C held, NaN included, is not read).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    scale_matrix_kernel(T* __restrict__ x, int ld, int rows, int cols, float s) {
  const int c = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (c >= cols) return;
  for (int r = static_cast<int>(blockIdx.y * blockDim.y + threadIdx.y); r < rows;
       r += static_cast<int>(gridDim.y * blockDim.y)) {
    T* p = x + static_cast<std::size_t>(r) * ld + c;
    *p = from_float<T>(s == 0.0f ? 0.0f : to_float(*p) * s);
  }
}

// ---- strided fp32 -> bf16 -----------------------------------------------------------------------
// One thread per pack of V columns of a row; block rows cover several short rows at once.
template <int V>
__global__ void __launch_bounds__(kThreads)
    to_bf16_kernel(__nv_bfloat16* __restrict__ out, int ld_out, const float* __restrict__ in,
                   int ld_in, int rows, int cols) {
  const int c = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (c >= cols) return;
  for (int r = static_cast<int>(blockIdx.y * blockDim.y + threadIdx.y); r < rows;
       r += static_cast<int>(gridDim.y * blockDim.y)) {
    float u[V];
    load(in + static_cast<std::size_t>(r) * ld_in + c, u);
    store(out + static_cast<std::size_t>(r) * ld_out + c, u);
  }
}

template <typename T>
void linear(T* out, const T* x, const T* y, std::size_t n, float a, float b, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = aligned(out, 16) && aligned(x, 16) && aligned(y, 16);
  map<V>(Axpby<T>{out, x, y, a, b}, n, vec, stream);
}

}  // namespace elementwise_detail

template <typename T>
void add_inplace(T* x, const T* y, std::size_t n, cudaStream_t stream) {
  elementwise_detail::linear(x, x, y, n, 1.0f, 1.0f, stream);
}

template <typename T>
void axpby(T* y, const T* x, std::size_t n, float a, float b, cudaStream_t stream) {
  elementwise_detail::linear(y, x, y, n, a, b, stream);
}

template <typename T>
void scale(T* x, std::size_t n, float s, cudaStream_t stream) {
  using namespace elementwise_detail;
  constexpr int V = 16 / sizeof(T);
  map<V>(Scale<T>{x, s}, n, aligned(x, 16), stream);
}

template <typename T>
void scale_matrix(T* x, int ld, int rows, int cols, float s, cudaStream_t stream) {
  using namespace elementwise_detail;
  if (rows <= 0 || cols <= 0) return;
  const int bx = std::min(ceil_div(cols, kWarpSize) * kWarpSize, kThreads), by = kThreads / bx;
  const dim3 grid(static_cast<unsigned>(ceil_div(cols, bx)),
                  std::min(static_cast<unsigned>(ceil_div(rows, by)), kMaxGridYZ));
  launch(scale_matrix_kernel<T>, grid, dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by)),
         0, stream, x, ld, rows, cols, s);
}

void convert_to_bf16(__nv_bfloat16* out, int ld_out, const float* in, int ld_in, int rows, int cols,
                     cudaStream_t stream) {
  using namespace elementwise_detail;
  if (rows <= 0 || cols <= 0) return;
  constexpr int V = 4;  // 16-byte loads, 8-byte stores
  const bool vec =
      cols % V == 0 && ld_in % V == 0 && ld_out % V == 0 && aligned(in, 16) && aligned(out, 8);
  const int packs = vec ? cols / V : cols;
  // Block x covers the packs of a row (at most kThreads), y as many rows as fill kThreads.
  const int bx = std::min(ceil_div(packs, kWarpSize) * kWarpSize, kThreads), by = kThreads / bx;
  const dim3 grid(static_cast<unsigned>(ceil_div(packs, bx)),
                  std::min(static_cast<unsigned>(ceil_div(rows, by)), kMaxGridYZ));
  const dim3 block(static_cast<unsigned>(bx), static_cast<unsigned>(by));
  if (vec) {
    launch(to_bf16_kernel<V>, grid, block, 0, stream, out, ld_out, in, ld_in, rows, cols);
  } else {
    launch(to_bf16_kernel<1>, grid, block, 0, stream, out, ld_out, in, ld_in, rows, cols);
  }
}

void convert_to_bf16_stochastic(__nv_bfloat16* out, const float* in, std::size_t n,
                                std::uint64_t seed, cudaStream_t stream) {
  using namespace elementwise_detail;
  map<4>(ToBf16Stochastic{out, in, seed}, n, aligned(in, 16) && aligned(out, 8), stream);
}

void convert_from_bf16(float* out, const __nv_bfloat16* in, std::size_t n, cudaStream_t stream) {
  using namespace elementwise_detail;
  map<4>(FromBf16{out, in}, n, aligned(in, 8) && aligned(out, 16), stream);
}

#define MOETRAIN_INSTANTIATE(T)                                                  \
  template void add_inplace<T>(T*, const T*, std::size_t, cudaStream_t);         \
  template void scale<T>(T*, std::size_t, float, cudaStream_t);                  \
  template void axpby<T>(T*, const T*, std::size_t, float, float, cudaStream_t); \
  template void scale_matrix<T>(T*, int, int, int, float, cudaStream_t);
MOETRAIN_INSTANTIATE(float)
MOETRAIN_INSTANTIATE(__nv_bfloat16)
#undef MOETRAIN_INSTANTIATE

}  // namespace moetrain::kernels
