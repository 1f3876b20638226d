// The group loops of grouped_gemm and grouped_gemm_wgrad (backend_ops.hpp), over any GEMM with
// gemm's signature: OpenBLAS's (gemm.cpp) or oneDNN's (onednn_matmul.cpp). One GEMM per group,
// each as large as its rows: the groups are few and uneven (experts' loads), so the GEMM's own
// threads take each of them rather than one thread a group.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace moetrain::cpu {

inline void check_group_offsets(const char* op, const std::int32_t* offsets, int groups, int rows) {
  if (offsets[groups] != rows)
    throw std::invalid_argument(std::string(op) + ": offsets end at " +
                                std::to_string(offsets[groups]) +
                                ", expected rows = " + std::to_string(rows));
}

// CPtr, Ptr: the operands' pointer types (const T* and T*, or the DevPtrs of mixed storage), with
// pointer arithmetic in elements.
template <typename T, typename CPtr, typename Ptr, typename Gemm>
void grouped_gemm_with(Gemm&& gemm, bool trans_b, int rows, int N, int K, T alpha, CPtr A, int lda,
                       CPtr B, int ldb, std::size_t stride_b, T beta, Ptr C, int ldc,
                       const std::int32_t* offsets, int groups) {
  check_group_offsets("grouped_gemm", offsets, groups, rows);
  for (int g = 0; g < groups; ++g) {
    const std::size_t r0 = std::size_t(offsets[g]);
    gemm(false, trans_b, offsets[g + 1] - offsets[g], N, K, alpha, A + r0 * std::size_t(lda), lda,
         B + stride_b * std::size_t(g), ldb, beta, C + r0 * std::size_t(ldc), ldc);
  }
}

template <typename T, typename CPtr, typename Ptr, typename Gemm>
void grouped_gemm_wgrad_with(Gemm&& gemm, int rows, int M, int N, T alpha, CPtr A, int lda, CPtr B,
                             int ldb, Ptr C, int ldc, std::size_t stride_c,
                             const std::int32_t* offsets, int groups) {
  check_group_offsets("grouped_gemm_wgrad", offsets, groups, rows);
  for (int g = 0; g < groups; ++g) {
    const std::size_t r0 = std::size_t(offsets[g]);
    gemm(true, false, M, N, offsets[g + 1] - offsets[g], alpha, A + r0 * std::size_t(lda), lda,
         B + r0 * std::size_t(ldb), ldb, T(1), C + stride_c * std::size_t(g), ldc);
  }
}

}  // namespace moetrain::cpu
