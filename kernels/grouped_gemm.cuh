// kernels/grouped_gemm.cu — the grouped GEMM of an MoE layer on the tensor cores (mma.sync through
// mma.cuh): every expert's product in one launch, each block finding its expert and row tile from
// the row offsets on the device, so the host never reads the offsets and the launch shape is
// fixed by the worst case. Contract of Backend::grouped_gemm (backend_ops.hpp); CPU reference
// src/backend/cpu/gemm.cpp.
//
//   grouped_gemm   for each group g < groups, rows r in [offsets[g], offsets[g+1]):
//                  C[r, :N] = alpha * A[r, :K] op(B_g) + beta * C[r, :N], B_g = B + g * stride_b,
//                  op(B_g) [K, N] (trans_b: B_g is stored [N, K]). A and B bf16, fp32
//                  accumulation, C fp32 or bf16 (TC); beta = 0 does not read C. A group without
//                  rows costs its blocks one scan of the offsets. offsets is a device array of
//                  groups + 1 entries, offsets[groups] <= rows; `rows` only sizes the launch.
//   grouped_gemm_wgrad
//                  C_g[M, N] += alpha A[rows_g, :M]^T B[rows_g, :N], C_g = C + g * stride_c: the
//                  experts' weight gradients, each summed over its rows in row order by one block
//                  per 64 x 64 tile (deterministic, no atomics); a group without rows adds nothing.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.cuh"

namespace moetrain::kernels {

template <typename TC>
void grouped_gemm(bool trans_b, int rows, int N, int K, float alpha, const __nv_bfloat16* A,
                  int lda, const __nv_bfloat16* B, int ldb, std::size_t stride_b, float beta, TC* C,
                  int ldc, const std::int32_t* offsets, int groups, cudaStream_t stream);

template <typename TC>
void grouped_gemm_wgrad(int M, int N, float alpha, const __nv_bfloat16* A, int lda,
                        const __nv_bfloat16* B, int ldb, TC* C, int ldc, std::size_t stride_c,
                        const std::int32_t* offsets, int groups, cudaStream_t stream);

}  // namespace moetrain::kernels
