// tests/simt/test_kernels.cu — kernels that test the simulator (and that nvcc compiles in the CUDA
// build, so the portable layer is proven on both sides). Written like kernels/*.cu.
#include "test_kernels.hpp"

namespace moetrain::simt_test {

using kernels::block_max;
using kernels::block_sum;
using kernels::dynamic_smem;
using kernels::kFullMask;
using kernels::launch;
using kernels::thread_rank;
using kernels::warp_sum;

// ---- reductions ---------------------------------------------------------------------------------
template <typename T, bool kSyncAfterStore>
__global__ void tree_sum_kernel(const T* __restrict__ in, T* __restrict__ out) {
  __shared__ T buf[kTreeBlock];
  const unsigned t = threadIdx.x;
  buf[t] = in[blockIdx.x * kTreeBlock + t];
  if constexpr (kSyncAfterStore) __syncthreads();
  for (unsigned s = kTreeBlock / 2; s > 0; s >>= 1) {
    if (t < s) buf[t] += buf[t + s];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = buf[0];
}

template <typename T>
static void tree_sum(const T* in, T* out, int blocks, bool sync_after_store, cudaStream_t stream) {
  if (sync_after_store) {
    launch(tree_sum_kernel<T, true>, dim3(blocks), dim3(kTreeBlock), 0, stream, in, out);
  } else {
    launch(tree_sum_kernel<T, false>, dim3(blocks), dim3(kTreeBlock), 0, stream, in, out);
  }
}
void tree_sum_f32(const float* in, float* out, int blocks, bool sync_after_store,
                  cudaStream_t stream) {
  tree_sum(in, out, blocks, sync_after_store, stream);
}
void tree_sum_i32(const int* in, int* out, int blocks, bool sync_after_store, cudaStream_t stream) {
  tree_sum(in, out, blocks, sync_after_store, stream);
}

__global__ void block_reduce_f32_kernel(const float* __restrict__ in, float* __restrict__ sums,
                                        float* __restrict__ maxs, int n_per_block) {
  const unsigned r = thread_rank(), nt = kernels::block_threads();
  const float* x = in + static_cast<size_t>(blockIdx.x) * n_per_block;
  float s = 0.0f, m = -INFINITY;
  for (unsigned i = r; i < static_cast<unsigned>(n_per_block); i += nt) {
    s += x[i];
    m = fmaxf(m, x[i]);
  }
  s = block_sum(s);
  m = block_max(m);
  if (r == 0) {
    sums[blockIdx.x] = s;
    maxs[blockIdx.x] = m;
  }
}
void block_reduce_f32(const float* in, float* sums, float* maxs, int n_per_block, int blocks,
                      dim3 block, cudaStream_t stream) {
  launch(block_reduce_f32_kernel, dim3(blocks), block, 0, stream, in, sums, maxs, n_per_block);
}

__global__ void block_sum_i64_kernel(const long long* __restrict__ in, long long* __restrict__ sums,
                                     int n_per_block) {
  const unsigned r = thread_rank(), nt = kernels::block_threads();
  const long long* x = in + static_cast<size_t>(blockIdx.x) * n_per_block;
  long long s = 0;
  for (unsigned i = r; i < static_cast<unsigned>(n_per_block); i += nt) s += x[i];
  s = block_sum(s);
  if (r == 0) sums[blockIdx.x] = s;
}
void block_sum_i64(const long long* in, long long* sums, int n_per_block, int blocks, dim3 block,
                   cudaStream_t stream) {
  launch(block_sum_i64_kernel, dim3(blocks), block, 0, stream, in, sums, n_per_block);
}

// ---- warp collectives ---------------------------------------------------------------------------
__global__ void shuffle_kernel(const int* __restrict__ in, const int* __restrict__ args,
                               const int* __restrict__ widths, int ncases,
                               int* __restrict__ out_int, float* __restrict__ out_float,
                               __nv_bfloat16* __restrict__ out_bf16,
                               double* __restrict__ out_double) {
  const unsigned t = threadIdx.x, lane = t & 31u, n = blockDim.x;
  const int v = in[t];
  const float f = static_cast<float>(v) * 0.5f;
  const __nv_bfloat16 h = __float2bfloat16_rn(static_cast<float>(v));
  const double d = static_cast<double>(v) * 0.25 + 1e10;
  for (int c = 0; c < ncases; ++c) {
    const int a = args[c], w = widths[c];
    const size_t o = static_cast<size_t>(c) * kShflOps * n + t;
    out_int[o + 0 * n] = __shfl_sync(kFullMask, v, (a + 7 * static_cast<int>(lane)) & 63, w);
    out_int[o + 1 * n] = __shfl_up_sync(kFullMask, v, static_cast<unsigned>(a & 31), w);
    out_int[o + 2 * n] = __shfl_down_sync(kFullMask, v, static_cast<unsigned>(a & 31), w);
    out_int[o + 3 * n] = __shfl_xor_sync(kFullMask, v, a & 31, w);
    out_float[o + 4 * n] = __shfl_xor_sync(kFullMask, f, a & 31, w);
    out_bf16[o + 5 * n] = __shfl_sync(kFullMask, h, (a + 7 * static_cast<int>(lane)) & 63, w);
    out_double[o + 6 * n] = __shfl_down_sync(kFullMask, d, static_cast<unsigned>(a & 31), w);
  }
}
void shuffles(const int* in, const int* args, const int* widths, int ncases, int* out_int,
              float* out_float, __nv_bfloat16* out_bf16, double* out_double, cudaStream_t stream) {
  launch(shuffle_kernel, dim3(1), dim3(kShflThreads), 0, stream, in, args, widths, ncases, out_int,
         out_float, out_bf16, out_double);
}

__global__ void vote_kernel(const unsigned* __restrict__ values, const int* __restrict__ preds,
                            unsigned* __restrict__ out) {
  const unsigned t = threadIdx.x, lane = t & 31u, n = blockDim.x;
  const unsigned v = values[t];
  const int p = preds[t];
  const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  unsigned k = 0;
  out[k++ * n + t] = __ballot_sync(kFullMask, p);
  out[k++ * n + t] = static_cast<unsigned>(__any_sync(kFullMask, p));
  out[k++ * n + t] = static_cast<unsigned>(__all_sync(kFullMask, p));
  out[k++ * n + t] = __ballot_sync(half, p);
  out[k++ * n + t] = static_cast<unsigned>(__any_sync(half, p));
  out[k++ * n + t] = static_cast<unsigned>(__all_sync(half, p));
  out[k++ * n + t] = __shfl_xor_sync(half, v, 1);
  out[k++ * n + t] = __shfl_sync(half, v, 3, 16);
  __syncwarp();
  out[k++ * n + t] = __reduce_add_sync(kFullMask, v);
  out[k++ * n + t] = __reduce_min_sync(kFullMask, v);
  out[k++ * n + t] = __reduce_max_sync(kFullMask, v);
  out[k++ * n + t] = static_cast<unsigned>(__reduce_min_sync(kFullMask, static_cast<int>(v)));
  out[k++ * n + t] = static_cast<unsigned>(__reduce_max_sync(kFullMask, static_cast<int>(v)));
  out[k++ * n + t] = __reduce_and_sync(kFullMask, v);
  out[k++ * n + t] = __reduce_or_sync(kFullMask, v);
  out[k++ * n + t] = __reduce_xor_sync(kFullMask, v);
  out[k++ * n + t] = __reduce_add_sync(half, v);
  out[k++ * n + t] = static_cast<unsigned>(warp_sum(static_cast<int>(v)));
  out[k++ * n + t] = static_cast<unsigned>(kernels::warp_max(static_cast<int>(v)));
  out[k++ * n + t] = static_cast<unsigned>(kernels::warp_min(static_cast<int>(v)));
}
void vote(const unsigned* values, const int* preds, unsigned* out, cudaStream_t stream) {
  launch(vote_kernel, dim3(1), dim3(kShflThreads), 0, stream, values, preds, out);
}

__global__ void barrier_votes_kernel(const int* __restrict__ preds, int* __restrict__ out) {
  const int p = preds[threadIdx.x];
  const int count = __syncthreads_count(p);
  const int all = __syncthreads_and(p);
  const int any = __syncthreads_or(p);
  if (threadIdx.x == 0) {
    out[0] = count;
    out[1] = all;
    out[2] = any;
  }
}
void barrier_votes(const int* preds, int threads, int* out, cudaStream_t stream) {
  launch(barrier_votes_kernel, dim3(1), dim3(threads), 0, stream, preds, out);
}

// ---- atomics ------------------------------------------------------------------------------------
// ints[0] += t + 1 per thread; ints[1] = max over threads of (block * 1000 + t); ints[2] = min of
// -(block * 1000 + t); ints[3] += 1 via an atomicCAS loop; ints[4] += per-block count of a
// __shared__ atomic counter; uints[0] += block; ull[0] += 2^33 per thread; floats[0] += 1.0f per
// thread; uints[1] = atomicInc wrapping at 7 per thread.
__global__ void atomics_kernel(int* ints, unsigned* uints, unsigned long long* ull, float* floats) {
  __shared__ int block_count;
  const int t = static_cast<int>(threadIdx.x), b = static_cast<int>(blockIdx.x);
  if (t == 0) block_count = 0;
  __syncthreads();
  atomicAdd(&ints[0], t + 1);
  atomicMax(&ints[1], b * 1000 + t);
  atomicMin(&ints[2], -(b * 1000 + t));
  int old = ints[3];
  for (;;) {
    const int seen = atomicCAS(&ints[3], old, old + 1);
    if (seen == old) break;
    old = seen;
  }
  atomicAdd(&block_count, 1);
  atomicAdd(&uints[0], static_cast<unsigned>(b));
  atomicAdd(&ull[0], 1ull << 33);
  atomicAdd(&floats[0], 1.0f);
  atomicInc(&uints[1], 7u);
  __syncthreads();
  if (t == 0) atomicAdd(&ints[4], block_count);
}
void atomics(int blocks, int threads, int* ints, unsigned* uints, unsigned long long* ull,
             float* floats, cudaStream_t stream) {
  launch(atomics_kernel, dim3(blocks), dim3(threads), 0, stream, ints, uints, ull, floats);
}

// ---- dynamic shared memory, vector types, bf16 --------------------------------------------------
__global__ void reverse_vec_kernel(const float4* __restrict__ in, float4* __restrict__ out,
                                   const int2* __restrict__ in2, int2* __restrict__ out2) {
  float4* s = dynamic_smem<float4>();
  int2* s2 = reinterpret_cast<int2*>(s + blockDim.x);
  const unsigned t = threadIdx.x, n = blockDim.x, base = blockIdx.x * n;
  s[t] = in[base + t];
  s2[t] = in2[base + t];
  __syncthreads();
  const float4 v = s[n - 1 - t];
  const int2 w = s2[n - 1 - t];
  out[base + t] = make_float4(v.w, v.z, v.y, v.x);
  out2[base + t] = make_int2(w.y, w.x);
}
void reverse_vec(const float4* in, float4* out, const int2* in2, int2* out2, int blocks,
                 int threads, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(threads) * (sizeof(float4) + sizeof(int2));
  launch(reverse_vec_kernel, dim3(blocks), dim3(threads), smem, stream, in, out, in2, out2);
}

__global__ void bf16_convert_kernel(const float* __restrict__ x, const unsigned* __restrict__ rand,
                                    int n, __nv_bfloat16* __restrict__ rn, float* __restrict__ back,
                                    __nv_bfloat16* __restrict__ sr) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= n) return;
  const __nv_bfloat16 h = kernels::float_to_bf16(x[i]);
  rn[i] = h;
  back[i] = kernels::bf16_to_float(h);
  sr[i] = kernels::float_to_bf16_stochastic(x[i], rand[i]);
}
void bf16_convert(const float* x, const unsigned* rand, int n, __nv_bfloat16* rn, float* back,
                  __nv_bfloat16* sr, cudaStream_t stream) {
  launch(bf16_convert_kernel, dim3(kernels::ceil_div(n, 128)), dim3(128), 0, stream, x, rand, n, rn,
         back, sr);
}

// ---- poisoned memory ----------------------------------------------------------------------------
__global__ void write_even_kernel(float* out, int n) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n && i % 2 == 0) out[i] = static_cast<float>(i);
}
void write_even(float* out, int n, cudaStream_t stream) {
  launch(write_even_kernel, dim3(kernels::ceil_div(n, 64)), dim3(64), 0, stream, out, n);
}

__global__ void stale_shared_kernel(float* out) {
  __shared__ float value;
  if (blockIdx.x == 0 && threadIdx.x == 0) value = 42.0f;
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = value;
}
void stale_shared(float* out, int blocks, cudaStream_t stream) {
  launch(stale_shared_kernel, dim3(blocks), dim3(32), 0, stream, out);
}

// ---- buggy kernels ------------------------------------------------------------------------------
__global__ void exit_before_barrier_kernel(int* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}
void exit_before_barrier(int* out, cudaStream_t stream) {
  launch(exit_before_barrier_kernel, dim3(2), dim3(64), 0, stream, out);
}

__global__ void barrier_vs_shuffle_kernel(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    v = __shfl_xor_sync(kFullMask, v, 1);
  }
  out[threadIdx.x] = v;
}
void barrier_vs_shuffle(int* out, cudaStream_t stream) {
  launch(barrier_vs_shuffle_kernel, dim3(1), dim3(32), 0, stream, out);
}

__global__ void divergent_collectives_kernel(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x < 16) {
    v = static_cast<int>(__ballot_sync(kFullMask, v & 1));
  } else {
    v = __shfl_xor_sync(kFullMask, v, 1);
  }
  out[threadIdx.x] = v;
}
void divergent_collectives(int* out, cudaStream_t stream) {
  launch(divergent_collectives_kernel, dim3(1), dim3(32), 0, stream, out);
}

__global__ void exit_before_shuffle_kernel(int* out) {
  if ((threadIdx.x & 31u) >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(kFullMask, static_cast<int>(threadIdx.x), 1);
}
void exit_before_shuffle(int* out, cudaStream_t stream) {
  launch(exit_before_shuffle_kernel, dim3(1), dim3(32), 0, stream, out);
}

__global__ void partial_warp_sum_kernel(const float* __restrict__ in, float* __restrict__ out) {
  out[threadIdx.x] = warp_sum(in[threadIdx.x]);
}
void partial_warp_sum(const float* in, float* out, cudaStream_t stream) {
  launch(partial_warp_sum_kernel, dim3(1), dim3(48), 0, stream, in, out);
}

__global__ void noop_kernel(int* out) {
  if (thread_rank() == 0 && blockIdx.x == 0) out[0] = 1;
}
void launch_with(dim3 grid, dim3 block, size_t smem_bytes, int* out, cudaStream_t stream) {
  launch(noop_kernel, grid, block, smem_bytes, stream, out);
}

__global__ void write_per_thread_kernel(float* out) {
  out[threadIdx.x] = static_cast<float>(threadIdx.x);
}
void write_per_thread(float* out, int threads, cudaStream_t stream) {
  launch(write_per_thread_kernel, dim3(1), dim3(threads), 0, stream, out);
}

// ---- performance --------------------------------------------------------------------------------
__global__ void sync_heavy_kernel(float* out, int iters) {
  float acc = static_cast<float>(threadIdx.x);
  for (int i = 0; i < iters; ++i) {
    __syncthreads();
    acc = warp_sum(acc) * 0.03125f;
  }
  if (threadIdx.x == 0) out[blockIdx.x] = acc;
}
void sync_heavy(float* out, int blocks, int threads, int iters, cudaStream_t stream) {
  launch(sync_heavy_kernel, dim3(blocks), dim3(threads), 0, stream, out, iters);
}

}  // namespace moetrain::simt_test
