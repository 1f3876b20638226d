// tests/simt/test_kernels.hpp — launchers of the simulator's test kernels (test_kernels.cu).
// Host-only declarations: included by test_simt.cpp (SIMT build) and cuda_link_check.cpp (CUDA
// build).
#pragma once

#include "common.cuh"

namespace moetrain::simt_test {

constexpr int kTreeBlock = 256;   // threads (and elements) per block of tree_sum_*
constexpr int kShflThreads = 64;  // one block of two warps
// Outputs per case of shuffles(): idx, up, down, xor (int), xor (float), idx (bf16), down (double).
constexpr int kShflOps = 7;
constexpr int kVoteOutputs = 20;  // outputs per thread of vote()

// Shared-memory tree sum of kTreeBlock elements per block; out[b] = sum of block b. With
// sync_after_store = false the __syncthreads between the stores and the first level is missing.
void tree_sum_f32(const float* in, float* out, int blocks, bool sync_after_store,
                  cudaStream_t stream = nullptr);
void tree_sum_i32(const int* in, int* out, int blocks, bool sync_after_store,
                  cudaStream_t stream = nullptr);

// Each block reduces n_per_block elements with common.cuh's block_sum / block_max: thread r of the
// block accumulates elements r, r + T, r + 2T, ... in order (T threads), then block_* combines.
void block_reduce_f32(const float* in, float* sums, float* maxs, int n_per_block, int blocks,
                      dim3 block, cudaStream_t stream = nullptr);
void block_sum_i64(const long long* in, long long* sums, int n_per_block, int blocks, dim3 block,
                   cudaStream_t stream = nullptr);

// One block of kShflThreads threads. For case c: idx source lane (args[c] + 7 * lane) & 63,
// up/down delta and xor lane mask args[c] & 31, width widths[c]. out[(c * kShflOps + k) * 64 + t].
void shuffles(const int* in, const int* args, const int* widths, int ncases, int* out_int,
              float* out_float, __nv_bfloat16* out_bf16, double* out_double,
              cudaStream_t stream = nullptr);
// Votes, reductions and half-warp collectives on per-thread (value, predicate); out[k * 64 + t].
void vote(const unsigned* values, const int* preds, unsigned* out, cudaStream_t stream = nullptr);
// __syncthreads_count/and/or over blockDim threads: out[0..2] from thread 0.
void barrier_votes(const int* preds, int threads, int* out, cudaStream_t stream = nullptr);

// Atomics from blocks x threads: see test_kernels.cu for what each counter receives.
void atomics(int blocks, int threads, int* ints, unsigned* uints, unsigned long long* ull,
             float* floats, cudaStream_t stream = nullptr);

// Reverses each block's float4 values through dynamic shared memory, swapping components (x,y,z,w)
// -> (w,z,y,x); adds int2 (a, b) -> (b, a). n = blocks * threads.
void reverse_vec(const float4* in, float4* out, const int2* in2, int2* out2, int blocks,
                 int threads, cudaStream_t stream = nullptr);
// bf16: rn[i] = float_to_bf16(x[i]), back[i] = bf16_to_float(rn[i]),
// sr[i] = float_to_bf16_stochastic(x[i], rand[i]).
void bf16_convert(const float* x, const unsigned* rand, int n, __nv_bfloat16* rn, float* back,
                  __nv_bfloat16* sr, cudaStream_t stream = nullptr);

// Writes out[i] = i for even i only (odd ones stay as cudaMalloc left them).
void write_even(float* out, int n, cudaStream_t stream = nullptr);
// out[b] = a __shared__ float that only block 0 writes (other blocks read stale/poisoned memory).
void stale_shared(float* out, int blocks, cudaStream_t stream = nullptr);

// Buggy kernels: each must make the simulator throw.
void exit_before_barrier(int* out,
                         cudaStream_t stream = nullptr);  // thread 5 returns, others __syncthreads
void barrier_vs_shuffle(int* out,
                        cudaStream_t stream = nullptr);  // lanes 0-15 __syncthreads, 16-31 shuffle
void divergent_collectives(int* out,
                           cudaStream_t stream = nullptr);  // ballot vs shuffle, same mask
void exit_before_shuffle(
    int* out, cudaStream_t stream = nullptr);  // lanes 16-31 return before a full shuffle
void partial_warp_sum(const float* in, float* out,
                      cudaStream_t stream = nullptr);  // warp_sum in a 48-thread block
void launch_with(dim3 grid, dim3 block, size_t smem_bytes, int* out,
                 cudaStream_t stream = nullptr);  // any config

// Writes out[t] = t for t < blockDim.x (= threads): out-of-bounds when out holds fewer floats.
void write_per_thread(float* out, int threads, cudaStream_t stream = nullptr);

// Performance: `iters` rounds of (__syncthreads, a warp_sum) in each of `blocks` blocks of
// `threads`.
void sync_heavy(float* out, int blocks, int threads, int iters, cudaStream_t stream = nullptr);

}  // namespace moetrain::simt_test
