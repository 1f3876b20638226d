// kernels/linalg.cuh — the kernels around the dense solvers of the linear-algebra ops
// (Backend::symmetric_eigenvectors_batched, qr_orthonormalize_batched, sort_eigenbasis; the
// solvers themselves are cuSOLVER's, called from src/backend/cuda/linalg.cpp). CPU reference:
// src/backend/cpu/linalg.cpp. fp32, `batch` contiguous n x n matrices.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.cuh"

namespace moetrain::kernels {

// out_b[r, c] = in_b[src(c), r] with src(c) = n - 1 - c when reverse_columns, else c: a row-major
// matrix to the column-major layout a solver takes and back; reversed, a solver's ascending
// eigenvectors (columns of its column-major output) become descending columns of a row-major Q.
void transpose_square(float* out, const float* in, int n, int batch, bool reverse_columns,
                      cudaStream_t stream);

// SOAP's refresh order (Backend::sort_eigenbasis): e_j = sum_r Q[r, j] PQ[r, j] (in double), the
// stable descending order o of e (NaN last), sorted[:, j] = PQ[:, o_j], v_out = v with its rows
// (v_rows_axis) or columns permuted by o. `workspace`: sort_eigenbasis_workspace_bytes(n, batch).
std::size_t sort_eigenbasis_workspace_bytes(int n, int batch);
void sort_eigenbasis(float* sorted, float* v_out, const float* Q, const float* PQ, const float* v,
                     int n, int batch, int v_rows, int v_cols, bool v_rows_axis, void* workspace,
                     cudaStream_t stream);

}  // namespace moetrain::kernels
