// kernels/symmetric_gemm.cuh — the batched symmetric ("Gram") GEMM of Newton–Schulz in the Muon
// optimizer on the tensor cores (mma.sync through mma.cuh): X X^T (or X^T X) is symmetric, so only
// the 64 x 64 tiles on and above the diagonal are computed, each value stored at (r, c) and (c, r)
// (the idea of Flash-Muon), about half the work of a full GEMM.
//
//   symmetric_gemm_batched
//                  for b < batch: D_b = alpha op(X_b) op(X_b)^T + beta C_b + shift I, [n, n],
//                  op(X_b) [n, k]: trans = false: X_b stored row-major [n, k] (row stride ldx),
//                  D = X X^T; trans = true: X_b stored [k, n] (row stride ldx), D = X^T X.
//                  X_b = X + b stride_x, C_b = C + b stride_c, D_b = D + b stride_d (row strides
//                  ldc, ldd). TX float or bf16: fp32 inputs are rounded to bf16 (to nearest even)
//                  as they are loaded into shared memory; TD float or bf16 (C and D); products
//                  summed in fp32 (mma_m16n8k16_bf16), the epilogue in fp32.
//                  C_b is symmetric and only its upper triangle (r <= c) is read; beta = 0 does
//                  not read C (C may be null then). C may be D (in place, with ldc = ldd and
//                  stride_c = stride_d): each pair (r, c), (c, r) is read and written by one
//                  thread, which reads C at (r, c), r <= c, before writing both.
//                  D_b is exactly (bitwise) symmetric: each value is computed once, from a tile on
//                  or above the diagonal, and stored at both places. Elements of D outside the
//                  n x n matrices (columns n .. ldd - 1, the gaps between matrices) are not
//                  written.
//                  Any n, k >= 1 (tails load as zero). k <= 0 throws std::invalid_argument (the
//                  caller scales an empty sum), as does beta != 0 without C; batch <= 0 or n <= 0
//                  does nothing. Grid: n_tiles (n_tiles + 1) / 2 blocks a matrix (n_tiles =
//                  ceil(n / 64)), at most 2^31 - 1, times batch, at most 65535; beyond, it throws
//                  std::invalid_argument naming n or batch.
#pragma once

#include <cstddef>

#include "common.cuh"

namespace moetrain::kernels {

template <typename TX, typename TD>
void symmetric_gemm_batched(bool trans, int n, int k, float alpha, const TX* X, int ldx,
                            std::size_t stride_x, float beta, const TD* C, int ldc,
                            std::size_t stride_c, float shift, TD* D, int ldd, std::size_t stride_d,
                            int batch, cudaStream_t stream);

}  // namespace moetrain::kernels
