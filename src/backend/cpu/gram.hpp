// The parts of symmetric_gemm_batched (backend_ops.hpp) around its product, shared by OpenBLAS's
// (syrk, gemm.cpp) and oneDNN's (a full product, onednn_matmul.cpp): the argument check, C's upper
// triangle into D before a product that sums into it, and the shift plus the mirror that make D
// exactly symmetric from its upper triangle.
#pragma once

#include <algorithm>
#include <cstddef>
#include <stdexcept>
#include <string>

namespace moetrain::cpu {

inline void check_gram_sum(int k) {
  if (k <= 0)
    throw std::invalid_argument("symmetric_gemm_batched: k = " + std::to_string(k) +
                                " (a Gram product needs k >= 1)");
}

// d[i, j] = c[i, j] for j >= i, of one n x n matrix.
template <typename T>
void copy_upper(T* d, int ldd, const T* c, int ldc, int n) {
  for (int i = 0; i < n; ++i)
    std::copy(c + std::size_t(i) * ldc + i, c + std::size_t(i) * ldc + n,
              d + std::size_t(i) * ldd + i);
}

// d += shift * I, then the lower triangle from the upper, of one n x n matrix.
template <typename T>
void shift_and_mirror_upper(T* d, int ldd, int n, T shift) {
  for (int i = 0; i < n; ++i) {
    d[std::size_t(i) * ldd + i] += shift;
    for (int j = 0; j < i; ++j) d[std::size_t(i) * ldd + j] = d[std::size_t(j) * ldd + i];
  }
}

}  // namespace moetrain::cpu
