// kernels/moe_permute.cu — MoE permutation kernels (contract: moe_permute.cuh, CPU reference
// src/backend/cpu/moe_permute.cpp).
//
// Permute = a stable counting sort of the tokens * k assignments by expert, in three launches over
// chunks of kChunk consecutive assignments (one block each):
//   1. count:  per-chunk expert histogram (shared-memory integer atomics) -> hist[e][chunk];
//   2. scan:   one block: offsets = exclusive scan of counts (block scan), then per expert a warp
//              scans hist[e][*] over the chunks, turning it in place into the chunk's first row;
//   3. rank:   each warp finds the lanes with the same expert by log2(E) + 1 ballots (radix-match),
//              its rank among them = popcount of the lower peers; per-warp expert counts in shared
//              memory give the rank across the chunk's warps; pos = chunk base + rank, exactly the
//              CPU's order. The same block then copies the rows x[a / k] -> xg[pos[a]], a warp per
//              row.
// The backward and the combine are one warp per token with 16-byte vector accesses where possible,
// fp32 accumulation in slot order (so the fp32 build matches the CPU sums bit for bit), and warp
// butterflies for the dgates dot products (deterministic, no float atomics anywhere).
#include "moe_permute.cuh"
#include "pack.cuh"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace moetrain::kernels {

namespace {

constexpr int kChunk = 256;  // assignments per block of the count and rank kernels
constexpr int kChunkWarps = kChunk / 32;
constexpr int kScanThreads = 1024;  // one thread per expert in the offsets scan
constexpr int kRowWarps = 8;        // tokens per block of the per-token kernels
constexpr int kRowThreads = 32 * kRowWarps;

int permute_chunks(int tokens, int k) {
  return std::max(1, ceil_div(tokens * k, kChunk));
}

void check_sizes(const char* op, int tokens, int d, int k, int n_experts) {
  if (tokens < 0 || d < 1 || k < 1 || n_experts < 1 || n_experts > kPermuteMaxExperts)
    throw std::invalid_argument(
        std::string(op) + ": need tokens >= 0, d >= 1, k >= 1, 1 <= n_experts <= " +
        std::to_string(kPermuteMaxExperts) + " (tokens " + std::to_string(tokens) + ", d " +
        std::to_string(d) + ", k " + std::to_string(k) + ", n_experts " +
        std::to_string(n_experts) + ")");
}

// Inclusive warp scan of v (every lane calls).
__device__ __forceinline__ int warp_inclusive_scan(int v, unsigned lane) {
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int o = __shfl_up_sync(kFullMask, v, static_cast<unsigned>(offset));
    if (static_cast<int>(lane) >= offset) v += o;
  }
  return v;
}

// ---- 1. per-chunk histogram ---------------------------------------------------------------------
__global__ void __launch_bounds__(kChunk)
    permute_count_kernel(int32_t* __restrict__ hist, const int32_t* __restrict__ topk,
                         int assignments, int n_experts, int chunks) {
  int* h = dynamic_smem<int>();
  const int tid = static_cast<int>(threadIdx.x);
  for (int e = tid; e < n_experts; e += kChunk) h[e] = 0;
  __syncthreads();
  const int a = static_cast<int>(blockIdx.x) * kChunk + tid;
  if (a < assignments) atomicAdd(&h[topk[a]], 1);
  __syncthreads();
  for (int e = tid; e < n_experts; e += kChunk)
    hist[static_cast<std::size_t>(e) * chunks + blockIdx.x] = h[e];
}

// ---- 2. offsets and per-chunk bases -------------------------------------------------------------
__global__ void __launch_bounds__(kScanThreads)
    permute_scan_kernel(int32_t* __restrict__ hist, int32_t* __restrict__ offsets,
                        const int32_t* __restrict__ counts, int n_experts, int chunks) {
  __shared__ int warp_totals[32];
  __shared__ int off[kPermuteMaxExperts];
  const int tid = static_cast<int>(threadIdx.x);
  const unsigned lane = lane_id(), warp = warp_id();

  // Block-wide exclusive scan of counts (one expert per thread).
  const int c = tid < n_experts ? counts[tid] : 0;
  const int incl = warp_inclusive_scan(c, lane);
  if (lane == 31) warp_totals[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int t = warp_totals[lane];
    warp_totals[lane] = warp_inclusive_scan(t, lane) - t;  // exclusive over warps
  }
  __syncthreads();
  const int excl = warp_totals[warp] + incl - c;
  if (tid < n_experts) {
    off[tid] = excl;
    offsets[tid] = excl;
    if (tid == n_experts - 1) offsets[n_experts] = excl + c;
  }
  __syncthreads();

  // Per expert: exclusive scan of its chunk counts, plus its offset -> the chunk's first row.
  for (int e = static_cast<int>(warp); e < n_experts; e += kScanThreads / 32) {
    int32_t* row = hist + static_cast<std::size_t>(e) * chunks;
    int carry = off[e];
    for (int base = 0; base < chunks; base += 32) {
      const int i = base + static_cast<int>(lane);
      const int v = i < chunks ? row[i] : 0;
      const int s = warp_inclusive_scan(v, lane);
      if (i < chunks) row[i] = carry + s - v;
      carry += __shfl_sync(kFullMask, s, 31);
    }
  }
}

// ---- 3. stable ranks and the row gather ---------------------------------------------------------
template <typename T, int V>
__global__ void __launch_bounds__(kChunk)
    permute_rank_gather_kernel(T* __restrict__ xg, int32_t* __restrict__ pos,
                               const T* __restrict__ x, const int32_t* __restrict__ topk,
                               const int32_t* __restrict__ base, int assignments, int d, int k,
                               int n_experts, int expert_bits, int chunks) {
  int* wcount = dynamic_smem<int>();  // [kChunkWarps][n_experts]: assignments per (warp, expert)
  const int tid = static_cast<int>(threadIdx.x);
  const unsigned lane = lane_id(), warp = warp_id();
  for (int i = tid; i < kChunkWarps * n_experts; i += kChunk) wcount[i] = 0;
  __syncthreads();

  const int a = static_cast<int>(blockIdx.x) * kChunk + tid;
  const bool valid = a < assignments;
  const int e = valid ? topk[a] : 0;
  // Lanes with the same expert (and validity): one ballot per bit of the expert id.
  const unsigned vmask = __ballot_sync(kFullMask, valid);
  unsigned peers = valid ? vmask : ~vmask;
  for (int b = 0; b < expert_bits; ++b) {
    const bool bit = (e >> b) & 1;
    const unsigned m = __ballot_sync(kFullMask, bit);
    peers &= bit ? m : ~m;
  }
  const unsigned lower = peers & ((1u << lane) - 1u);
  const int rank = __popc(lower);
  if (valid && lower == 0) wcount[warp * n_experts + e] = __popc(peers);
  __syncthreads();

  int my_pos = -1;
  if (valid) {
    int r = base[static_cast<std::size_t>(e) * chunks + blockIdx.x] + rank;
    for (unsigned w = 0; w < warp; ++w) r += wcount[w * n_experts + e];
    my_pos = r;
    pos[a] = r;
  }

  // Gather: the warp copies the rows of its 32 assignments, one row at a time.
  const int a0 = static_cast<int>(blockIdx.x) * kChunk + static_cast<int>(warp) * 32;
  for (int i = 0; i < 32 && a0 + i < assignments; ++i) {
    const int p = __shfl_sync(kFullMask, my_pos, i);
    const T* src = x + static_cast<std::size_t>((a0 + i) / k) * d;
    T* dst = xg + static_cast<std::size_t>(p) * d;
    for (int c = static_cast<int>(lane) * V; c < d; c += 32 * V)
      store_pack<T, V>(dst + c, load_pack<T, V>(src + c));
  }
}

// ---- backward of the permutation: dx[t] += sum_j dxg[pos[t k + j]] ------------------------------
template <typename T, int V>
__global__ void __launch_bounds__(kRowThreads)
    permute_backward_kernel(T* __restrict__ dx, const T* __restrict__ dxg,
                            const int32_t* __restrict__ pos, int tokens, int d, int k) {
  const int t = static_cast<int>(blockIdx.x) * kRowWarps + static_cast<int>(warp_id());
  if (t >= tokens) return;
  const int32_t* p = pos + static_cast<std::size_t>(t) * k;
  T* o = dx + static_cast<std::size_t>(t) * d;
  for (int c = static_cast<int>(lane_id()) * V; c < d; c += 32 * V) {
    Pack<T, V> out = load_pack<T, V>(o + c);
    float acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = to_float(out.v[v]);
    for (int j = 0; j < k; ++j) {
      const Pack<T, V> g = load_pack<T, V>(dxg + static_cast<std::size_t>(p[j]) * d + c);
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] += to_float(g.v[v]);
    }
#pragma unroll
    for (int v = 0; v < V; ++v) out.v[v] = from_float<T>(acc[v]);
    store_pack<T, V>(o + c, out);
  }
}

// ---- combine: y[t] = sum_j gates[t, j] yg[pos[t k + j]] -----------------------------------------
template <typename T, int V>
__global__ void __launch_bounds__(kRowThreads)
    unpermute_kernel(T* __restrict__ y, const T* __restrict__ yg, const float* __restrict__ gates,
                     const int32_t* __restrict__ pos, int tokens, int d, int k) {
  const int t = static_cast<int>(blockIdx.x) * kRowWarps + static_cast<int>(warp_id());
  if (t >= tokens) return;
  const int32_t* p = pos + static_cast<std::size_t>(t) * k;
  const float* w = gates + static_cast<std::size_t>(t) * k;
  T* o = y + static_cast<std::size_t>(t) * d;
  for (int c = static_cast<int>(lane_id()) * V; c < d; c += 32 * V) {
    float acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = 0.0f;
    for (int j = 0; j < k; ++j) {
      const float wj = w[j];
      const Pack<T, V> g = load_pack<T, V>(yg + static_cast<std::size_t>(p[j]) * d + c);
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] += wj * to_float(g.v[v]);
    }
    Pack<T, V> out;
#pragma unroll
    for (int v = 0; v < V; ++v) out.v[v] = from_float<T>(acc[v]);
    store_pack<T, V>(o + c, out);
  }
}

// ---- combine backward: dyg[pos] = gate dy[t]; dgates[t, j] = dy[t] . yg[pos] --------------------
template <typename T, int V>
__global__ void __launch_bounds__(kRowThreads)
    unpermute_backward_kernel(T* __restrict__ dyg, float* __restrict__ dgates,
                              const T* __restrict__ dy, const T* __restrict__ yg,
                              const float* __restrict__ gates, const int32_t* __restrict__ pos,
                              int tokens, int d, int k) {
  const int t = static_cast<int>(blockIdx.x) * kRowWarps + static_cast<int>(warp_id());
  if (t >= tokens) return;  // warp-uniform: the butterfly below sees full warps only
  const unsigned lane = lane_id();
  const T* g = dy + static_cast<std::size_t>(t) * d;
  for (int j = 0; j < k; ++j) {
    const std::size_t row = static_cast<std::size_t>(pos[static_cast<std::size_t>(t) * k + j]) * d;
    const float wj = gates[static_cast<std::size_t>(t) * k + j];
    float dot = 0.0f;
    for (int c = static_cast<int>(lane) * V; c < d; c += 32 * V) {
      const Pack<T, V> gv = load_pack<T, V>(g + c);
      const Pack<T, V> yv = load_pack<T, V>(yg + row + c);
      Pack<T, V> out;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const float gf = to_float(gv.v[v]);
        out.v[v] = from_float<T>(wj * gf);
        dot += gf * to_float(yv.v[v]);
      }
      store_pack<T, V>(dyg + row + c, out);
    }
    dot = warp_sum(dot);
    if (lane == 0) dgates[static_cast<std::size_t>(t) * k + j] = dot;
  }
}

constexpr int vec_width_of(std::size_t elem_bytes) {
  return static_cast<int>(16 / elem_bytes);
}

// Whether rows of d elements at these pointers can be accessed as 16-byte vectors.
template <typename T>
bool can_vectorize(int d, std::initializer_list<const void*> ptrs) {
  if ((static_cast<std::size_t>(d) * sizeof(T)) % 16 != 0) return false;
  for (const void* p : ptrs)
    if (!aligned(p, 16)) return false;
  return true;
}

}  // namespace

std::size_t moe_permute_workspace_bytes(int tokens, int n_experts, int k) {
  return sizeof(int32_t) * static_cast<std::size_t>(n_experts) * permute_chunks(tokens, k);
}

template <typename T>
void moe_permute(T* xg, int32_t* pos, int32_t* offsets, const T* x, const int32_t* topk,
                 const int32_t* counts, int tokens, int d, int n_experts, int k, void* workspace,
                 cudaStream_t stream) {
  check_sizes("moe_permute", tokens, d, k, n_experts);
  const int assignments = tokens * k, chunks = permute_chunks(tokens, k);
  const int expert_bits =
      n_experts > 1 ? 32 - __builtin_clz(static_cast<unsigned>(n_experts - 1)) : 0;
  int32_t* hist = static_cast<int32_t*>(workspace);
  launch(permute_count_kernel, dim3(chunks), dim3(kChunk), sizeof(int) * n_experts, stream, hist,
         topk, assignments, n_experts, chunks);
  launch(permute_scan_kernel, dim3(1), dim3(kScanThreads), 0, stream, hist, offsets, counts,
         n_experts, chunks);
  const std::size_t smem = sizeof(int) * static_cast<std::size_t>(kChunkWarps) * n_experts;
  constexpr int V = vec_width_of(sizeof(T));
  if (can_vectorize<T>(d, {xg, x})) {
    launch(permute_rank_gather_kernel<T, V>, dim3(chunks), dim3(kChunk), smem, stream, xg, pos, x,
           topk, static_cast<const int32_t*>(hist), assignments, d, k, n_experts, expert_bits,
           chunks);
  } else {
    launch(permute_rank_gather_kernel<T, 1>, dim3(chunks), dim3(kChunk), smem, stream, xg, pos, x,
           topk, static_cast<const int32_t*>(hist), assignments, d, k, n_experts, expert_bits,
           chunks);
  }
}

template <typename T>
void moe_permute_backward(T* dx, const T* dxg, const int32_t* pos, int tokens, int d, int k,
                          cudaStream_t stream) {
  check_sizes("moe_permute_backward", tokens, d, k, 1);
  if (tokens == 0) return;
  const dim3 grid(ceil_div(tokens, kRowWarps));
  constexpr int V = vec_width_of(sizeof(T));
  if (can_vectorize<T>(d, {dx, dxg}))
    launch(permute_backward_kernel<T, V>, grid, dim3(kRowThreads), 0, stream, dx, dxg, pos, tokens,
           d, k);
  else
    launch(permute_backward_kernel<T, 1>, grid, dim3(kRowThreads), 0, stream, dx, dxg, pos, tokens,
           d, k);
}

template <typename T>
void moe_unpermute(T* y, const T* yg, const float* gates, const int32_t* pos, int tokens, int d,
                   int k, cudaStream_t stream) {
  check_sizes("moe_unpermute", tokens, d, k, 1);
  if (tokens == 0) return;
  const dim3 grid(ceil_div(tokens, kRowWarps));
  constexpr int V = vec_width_of(sizeof(T));
  if (can_vectorize<T>(d, {y, yg}))
    launch(unpermute_kernel<T, V>, grid, dim3(kRowThreads), 0, stream, y, yg, gates, pos, tokens, d,
           k);
  else
    launch(unpermute_kernel<T, 1>, grid, dim3(kRowThreads), 0, stream, y, yg, gates, pos, tokens, d,
           k);
}

template <typename T>
void moe_unpermute_backward(T* dyg, float* dgates, const T* dy, const T* yg, const float* gates,
                            const int32_t* pos, int tokens, int d, int k, cudaStream_t stream) {
  check_sizes("moe_unpermute_backward", tokens, d, k, 1);
  if (tokens == 0) return;
  const dim3 grid(ceil_div(tokens, kRowWarps));
  constexpr int V = vec_width_of(sizeof(T));
  if (can_vectorize<T>(d, {dyg, dy, yg}))
    launch(unpermute_backward_kernel<T, V>, grid, dim3(kRowThreads), 0, stream, dyg, dgates, dy, yg,
           gates, pos, tokens, d, k);
  else
    launch(unpermute_backward_kernel<T, 1>, grid, dim3(kRowThreads), 0, stream, dyg, dgates, dy, yg,
           gates, pos, tokens, d, k);
}

#define MOETRAIN_PERMUTE_INSTANTIATE(T)                                                          \
  template void moe_permute<T>(T*, int32_t*, int32_t*, const T*, const int32_t*, const int32_t*, \
                               int, int, int, int, void*, cudaStream_t);                         \
  template void moe_permute_backward<T>(T*, const T*, const int32_t*, int, int, int,             \
                                        cudaStream_t);                                           \
  template void moe_unpermute<T>(T*, const T*, const float*, const int32_t*, int, int, int,      \
                                 cudaStream_t);                                                  \
  template void moe_unpermute_backward<T>(T*, float*, const T*, const T*, const float*,          \
                                          const int32_t*, int, int, int, cudaStream_t);
MOETRAIN_PERMUTE_INSTANTIATE(float)
MOETRAIN_PERMUTE_INSTANTIATE(__nv_bfloat16)
#undef MOETRAIN_PERMUTE_INSTANTIATE

}  // namespace moetrain::kernels
