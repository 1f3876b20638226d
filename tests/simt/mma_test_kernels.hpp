// tests/simt/mma_test_kernels.hpp — launchers of the test kernels of kernels/mma.cuh
// (mma_test_kernels.cu): the tensor-core primitives lane by lane, a small GEMM built on them, and
// kernels that misuse them. Host-only declarations, included by test_mma.cpp (simulator and GPU
// builds) and cuda_link_check.cpp.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace moetrain::mma_test {

// Each warp w of one block of 32 * warps threads runs one mma_m16n8k16_bf16 on its lanes' raw
// fragments (kernels/mma.cuh): thread x = 32 * w + lane reads a[4x .. 4x+3], b[2x, 2x+1],
// c[4x .. 4x+3] and writes d[4x .. 4x+3]. in_place: the kernel accumulates into the registers it
// loaded c into (d and c the same array), as GEMM loops do.
void mma_fragments(const uint32_t* a, const uint32_t* b, const float* c, float* d, int warps,
                   bool in_place, cudaStream_t stream = nullptr);

enum class Ldmatrix { X1, X2, X4, X1Trans, X2Trans, X4Trans };
__host__ __device__ constexpr int matrices(Ldmatrix v) {  // 8x8 matrices loaded
  return v == Ldmatrix::X1 || v == Ldmatrix::X1Trans   ? 1
         : v == Ldmatrix::X2 || v == Ldmatrix::X2Trans ? 2
                                                       : 4;
}
__host__ __device__ constexpr bool transposed(Ldmatrix v) {
  return v == Ldmatrix::X1Trans || v == Ldmatrix::X2Trans || v == Ldmatrix::X4Trans;
}

// One warp: copies smem_elems 16-bit values from src into dynamic shared memory, then lane l runs
// the ldmatrix variant on the row address smem + row_offset[l] (an element offset) and writes its
// registers to out[4l + q], q < matrices(variant). from_global: the lanes pass src + row_offset[l]
// (global memory) instead.
void ldmatrix_fragments(Ldmatrix variant, const uint16_t* src, int smem_elems,
                        const int* row_offset, uint32_t* out, bool from_global,
                        cudaStream_t stream = nullptr);

// C[M, N] = A[M, K] * B[K, N], row-major, bf16 in and fp32 out: 32x32 tiles of C per block of
// four warps, each warp a 16x16 quarter from ldmatrix_x4 (A) and two mma per 16-wide step of K;
// tails are zero-filled in shared memory. B's fragments come, by the recipes of kernels/mma.cuh,
// from one ldmatrix_x4_trans (X4Trans) or two ldmatrix_x2_trans (X2Trans) of the K x N tile, or
// (X2Transposed: B holds B^T, N x K row-major) two ldmatrix_x2 of the N x K tile.
enum class GemmB { X4Trans, X2Trans, X2Transposed };
void gemm_bf16(GemmB variant, const __nv_bfloat16* A, const __nv_bfloat16* B, float* C, int M,
               int N, int K, cudaStream_t stream = nullptr);

// Kernels that misuse mma_m16n8k16_bf16, each in one block (the simulator must throw):
//   LaneExits          lane 5 returns before the mma the other 31 lanes execute;
//   DivergentBranches  lanes 0-15 execute it in one branch of a lane-dependent `if`, 16-31 in the
//                      other (two instructions);
//   VersusSyncwarp     lanes 0-15 execute it, lanes 16-31 a full-mask __syncwarp;
//   PartialWarp        a block of 48 threads: warp 1 has 16 lanes.
enum class MmaBug { LaneExits, DivergentBranches, VersusSyncwarp, PartialWarp };
void mma_bug(MmaBug bug, float* out, cudaStream_t stream = nullptr);  // out: 48 floats

}  // namespace moetrain::mma_test
