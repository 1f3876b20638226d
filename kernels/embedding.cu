// kernels/embedding.cu — token embedding lookup and its deterministic backward. See embedding.cuh.
//
// forward:  one warp per token row (grid-stride over rows), lanes copy packs of the row (16 bytes
//           of the output; scalar elements when d or a pointer does not allow packs), converting
//           when the table's type is not the output's. n*d elements read and written.
// backward: keys[i] = token << 32 | i are unique, so any correct sort orders them the same way:
//           (1) keys kernel, (2) bitonic sort: tiles of up to kSortTile keys sorted in shared
//           memory, larger strides in global steps, (3) one warp per sorted position that starts a
//           token's segment: lanes own packs of columns, walk the segment in position order and add
//           the dout rows in fp32 onto the old dtable row, then write the row once. No atomics at
//           all; every dtable row is written by exactly one warp.
#include "embedding.cuh"
#include "pack.cuh"

#include <type_traits>

namespace moetrain::kernels {
namespace embedding_detail {

constexpr int kThreads = 256;  // 8 warps, one row (or segment) each
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kDefaultMaxBlocks = 4096;  // grid-stride beyond this
constexpr unsigned kSortTile = 2048;     // keys sorted per block in shared memory (16 KiB)

// ---- forward ------------------------------------------------------------------------------------
template <typename T, typename TW, int V>
__global__ void __launch_bounds__(kThreads)
    embedding_forward_kernel(T* __restrict__ out, const int32_t* __restrict__ tokens,
                             const TW* __restrict__ table, int n, int d) {
  using P = Pack<T, V>;
  const int packs = d / V;
  const int lane = static_cast<int>(lane_id());
  for (int row = static_cast<int>(blockIdx.x) * kWarps + static_cast<int>(warp_id()); row < n;
       row += static_cast<int>(gridDim.x) * kWarps) {
    const int tok = tokens[row];
    P* dst = reinterpret_cast<P*>(out + static_cast<std::size_t>(row) * d);
    if (tok < 0) {
      P zero;
#pragma unroll
      for (int k = 0; k < V; ++k) zero.v[k] = from_float<T>(0.0f);
      for (int p = lane; p < packs; p += kWarpSize) dst[p] = zero;
    } else {
      const TW* src = table + static_cast<std::size_t>(tok) * d;
      for (int p = lane; p < packs; p += kWarpSize) {
        if constexpr (std::is_same_v<T, TW>) {
          dst[p] = reinterpret_cast<const P*>(src)[p];
        } else {
          float v[V];
          load(src + p * V, v);
          store(out + static_cast<std::size_t>(row) * d + p * V, v);
        }
      }
    }
  }
}

// ---- backward: sort keys ------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads)
    embedding_keys_kernel(uint64_t* __restrict__ keys, const int32_t* __restrict__ tokens, int n,
                          unsigned count) {
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) {
    keys[i] = i < static_cast<unsigned>(n)
                  ? (static_cast<uint64_t>(static_cast<uint32_t>(tokens[i])) << 32) | i
                  : ~uint64_t(0);  // padding sorts last
  }
}

// Bitonic network over `count` (a power of two) keys, ascending. This kernel runs the stages
// k = k_first, 2 k_first, ..., k_last, each with the strides j < tile (partners in the same tile):
// block b loads keys[b*tile, (b+1)*tile) into shared memory; thread t handles one pair per stride.
__global__ void __launch_bounds__(kSortTile / 2)
    embedding_sort_tile_kernel(uint64_t* __restrict__ keys, unsigned tile, unsigned k_first,
                               unsigned k_last) {
  __shared__ uint64_t s[kSortTile];
  const unsigned t = threadIdx.x, half = tile / 2, base = blockIdx.x * tile;
  s[t] = keys[base + t];
  s[t + half] = keys[base + t + half];
  for (unsigned k = k_first; k <= k_last; k <<= 1) {
    for (unsigned j = (k < tile ? k : tile) / 2; j > 0; j >>= 1) {
      __syncthreads();
      const unsigned i = 2 * j * (t / j) + (t % j), l = i + j;  // i has bit j clear
      const bool ascending = ((base + i) & k) == 0;
      const uint64_t a = s[i], b = s[l];
      if ((a > b) == ascending) {
        s[i] = b;
        s[l] = a;
      }
    }
  }
  __syncthreads();
  keys[base + t] = s[t];
  keys[base + t + half] = s[t + half];
}

// One compare-exchange stride j >= tile of stage k, over the whole array.
__global__ void __launch_bounds__(kThreads)
    embedding_sort_global_kernel(uint64_t* __restrict__ keys, unsigned count, unsigned k,
                                 unsigned j) {
  for (unsigned p = blockIdx.x * blockDim.x + threadIdx.x; p < count / 2;
       p += gridDim.x * blockDim.x) {
    const unsigned i = 2 * j * (p / j) + (p % j), l = i + j;
    const bool ascending = (i & k) == 0;
    const uint64_t a = keys[i], b = keys[l];
    if ((a > b) == ascending) {
      keys[i] = b;
      keys[l] = a;
    }
  }
}

// ---- backward: segment sums ---------------------------------------------------------------------
template <typename T, typename TW, int V>
__global__ void __launch_bounds__(kThreads)
    embedding_backward_kernel(TW* __restrict__ dtable, const T* __restrict__ dout,
                              const uint64_t* __restrict__ keys, int n, int d) {
  using P = Pack<T, V>;
  const int packs = d / V;
  const int lane = static_cast<int>(lane_id());
  for (int p = static_cast<int>(blockIdx.x) * kWarps + static_cast<int>(warp_id()); p < n;
       p += static_cast<int>(gridDim.x) * kWarps) {
    const uint32_t tok = static_cast<uint32_t>(keys[p] >> 32);
    if (static_cast<int32_t>(tok) < 0) continue;                             // padding token
    if (p > 0 && static_cast<uint32_t>(keys[p - 1] >> 32) == tok) continue;  // not a segment start
    TW* row = dtable + static_cast<std::size_t>(tok) * d;
    for (int c = lane; c < packs; c += kWarpSize) {
      float acc[V];
      load(row + c * V, acc);
      for (int q = p; q < n; ++q) {
        const uint64_t key = keys[q];
        if (static_cast<uint32_t>(key >> 32) != tok) break;
        const uint32_t i = static_cast<uint32_t>(key);
        const P g = reinterpret_cast<const P*>(dout + static_cast<std::size_t>(i) * d)[c];
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] += to_float(g.v[k]);
      }
      store(row + c * V, acc);
    }
  }
}

inline unsigned sort_count(int n) {
  unsigned c = 2;
  while (c < static_cast<unsigned>(n)) c <<= 1;
  return c;
}

inline unsigned grid_for(long long work_items, int per_block, int max_blocks) {
  const long long cap = max_blocks > 0 ? max_blocks : kDefaultMaxBlocks;
  long long blocks = (work_items + per_block - 1) / per_block;
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks);
}

}  // namespace embedding_detail

template <typename T, typename TW>
void embedding_forward(T* out, const int32_t* tokens, const TW* table, int n, int d,
                       cudaStream_t stream, int max_blocks) {
  using namespace embedding_detail;
  if (n <= 0 || d <= 0) return;
  constexpr int kVec = 16 / sizeof(T);
  const dim3 grid(grid_for(n, kWarps, max_blocks));
  if (d % kVec == 0 && aligned(out, 16) && aligned(table, sizeof(TW) * kVec)) {
    launch(embedding_forward_kernel<T, TW, kVec>, grid, dim3(kThreads), 0, stream, out, tokens,
           table, n, d);
  } else {
    launch(embedding_forward_kernel<T, TW, 1>, grid, dim3(kThreads), 0, stream, out, tokens, table,
           n, d);
  }
}

std::size_t embedding_backward_workspace_bytes(int n) {
  return n <= 0 ? 0 : static_cast<std::size_t>(embedding_detail::sort_count(n)) * sizeof(uint64_t);
}

template <typename T, typename TW>
void embedding_backward(TW* dtable, const T* dout, const int32_t* tokens, int n, int d,
                        void* workspace, cudaStream_t stream, int max_blocks) {
  using namespace embedding_detail;
  if (n <= 0 || d <= 0) return;
  if (static_cast<long long>(n) > (1ll << 30))
    throw std::invalid_argument("embedding_backward: more than 2^30 tokens");
  uint64_t* keys = static_cast<uint64_t*>(workspace);
  const unsigned count = sort_count(n);
  launch(embedding_keys_kernel, dim3(grid_for(count, kThreads, max_blocks)), dim3(kThreads), 0,
         stream, keys, tokens, n, count);
  const unsigned tile = count < kSortTile ? count : kSortTile;
  launch(embedding_sort_tile_kernel, dim3(count / tile), dim3(tile / 2), 0, stream, keys, tile, 2u,
         tile);
  for (unsigned k = 2 * tile; k <= count; k <<= 1) {
    for (unsigned j = k / 2; j >= tile; j >>= 1) {
      launch(embedding_sort_global_kernel, dim3(grid_for(count / 2, kThreads, max_blocks)),
             dim3(kThreads), 0, stream, keys, count, k, j);
    }
    launch(embedding_sort_tile_kernel, dim3(count / tile), dim3(tile / 2), 0, stream, keys, tile, k,
           k);
  }
  constexpr int kVec = 16 / sizeof(T);
  const dim3 grid(grid_for(n, kWarps, max_blocks));
  if (d % kVec == 0 && aligned(dtable, sizeof(TW) * kVec) && aligned(dout, 16)) {
    launch(embedding_backward_kernel<T, TW, kVec>, grid, dim3(kThreads), 0, stream, dtable, dout,
           keys, n, d);
  } else {
    launch(embedding_backward_kernel<T, TW, 1>, grid, dim3(kThreads), 0, stream, dtable, dout, keys,
           n, d);
  }
}

#define MOETRAIN_EMBEDDING_INSTANTIATE(T, TW)                                                   \
  template void embedding_forward<T, TW>(T*, const int32_t*, const TW*, int, int, cudaStream_t, \
                                         int);                                                  \
  template void embedding_backward<T, TW>(TW*, const T*, const int32_t*, int, int, void*,       \
                                          cudaStream_t, int);
MOETRAIN_EMBEDDING_INSTANTIATE(float, float)
MOETRAIN_EMBEDDING_INSTANTIATE(__nv_bfloat16, __nv_bfloat16)
MOETRAIN_EMBEDDING_INSTANTIATE(__nv_bfloat16, float)  // bf16 activations, the fp32 master table
#undef MOETRAIN_EMBEDDING_INSTANTIATE

}  // namespace moetrain::kernels
