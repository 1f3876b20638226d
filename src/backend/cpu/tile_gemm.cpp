#include "backend/cpu/tile_gemm.hpp"

#include <algorithm>

namespace moetrain::cpu {

namespace {

// 64-byte vectors (GCC's vector extension: one zmm register with AVX-512, two ymm with AVX2), and
// the same type at element alignment for loads and stores through a pointer (one unaligned move;
// a memcpy into a vector variable can become two 32-byte stores and a 64-byte reload, which
// stalls store forwarding).
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
  typedef float unaligned __attribute__((vector_size(64), aligned(4), may_alias));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
  typedef double unaligned __attribute__((vector_size(64), aligned(8), may_alias));
};

// R rows of C times V vectors of columns, accumulated in registers over the whole k loop: each k
// loads V vectors of B's row once and does R * V multiply-adds with them.
template <typename T, int R, int V>
inline __attribute__((always_inline)) void block(int K, T alpha, const T* A, std::ptrdiff_t a_row,
                                                 std::ptrdiff_t a_col, const T* B, int ldb, T* C,
                                                 int ldc, bool accumulate) {
  using v = typename Vec<T>::type;
  using u = typename Vec<T>::unaligned;
  constexpr int L = int(sizeof(v) / sizeof(T));
  v acc[R][V];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < V; ++j) acc[i][j] = v{};
  for (int k = 0; k < K; ++k) {
    const T* b = B + std::ptrdiff_t(k) * ldb;
    v bv[V];
    for (int j = 0; j < V; ++j) bv[j] = *reinterpret_cast<const u*>(b + j * L);
    for (int i = 0; i < R; ++i) {
      const T a = A[i * a_row + k * a_col];
      for (int j = 0; j < V; ++j) acc[i][j] += a * bv[j];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < V; ++j) {
      T* c = C + std::ptrdiff_t(i) * ldc + j * L;
      u* cv = reinterpret_cast<u*>(c);
      *cv = accumulate ? *cv + alpha * acc[i][j] : alpha * acc[i][j];
    }
}

// The columns left of a row block that fill no whole vector, one at a time in the same k order.
template <typename T>
void tail(int rows, int cols, int K, T alpha, const T* A, std::ptrdiff_t a_row,
          std::ptrdiff_t a_col, const T* B, int ldb, T* C, int ldc, bool accumulate) {
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) {
      T s = 0;
      for (int k = 0; k < K; ++k) s += A[i * a_row + k * a_col] * B[std::ptrdiff_t(k) * ldb + j];
      T& c = C[std::ptrdiff_t(i) * ldc + j];
      c = accumulate ? c + alpha * s : alpha * s;
    }
}

template <typename T, int R>
inline __attribute__((always_inline)) void row_block(int N, int K, T alpha, const T* A,
                                                     std::ptrdiff_t a_row, std::ptrdiff_t a_col,
                                                     const T* B, int ldb, T* C, int ldc,
                                                     bool accumulate) {
  constexpr int L = int(sizeof(typename Vec<T>::type) / sizeof(T));
  int n0 = 0;
  for (; n0 + 4 * L <= N; n0 += 4 * L)
    block<T, R, 4>(K, alpha, A, a_row, a_col, B + n0, ldb, C + n0, ldc, accumulate);
  switch ((N - n0) / L) {
    case 3:
      block<T, R, 3>(K, alpha, A, a_row, a_col, B + n0, ldb, C + n0, ldc, accumulate);
      break;
    case 2:
      block<T, R, 2>(K, alpha, A, a_row, a_col, B + n0, ldb, C + n0, ldc, accumulate);
      break;
    case 1:
      block<T, R, 1>(K, alpha, A, a_row, a_col, B + n0, ldb, C + n0, ldc, accumulate);
      break;
    default:
      break;
  }
  n0 += (N - n0) / L * L;
  if (n0 < N) tail(R, N - n0, K, alpha, A, a_row, a_col, B + n0, ldb, C + n0, ldc, accumulate);
}

template <typename T>
inline __attribute__((always_inline)) void tile_gemm_impl(int M, int N, int K, T alpha, const T* A,
                                                          std::ptrdiff_t a_row,
                                                          std::ptrdiff_t a_col, const T* B, int ldb,
                                                          T* C, int ldc, bool accumulate) {
  // Six rows: 24 accumulators and 4 B vectors of AVX-512's 32 registers, 24 multiply-adds per 10
  // loads (4 rows: 16 per 8). On a Zen 4 core a 64^3 tile ran at 88-90 GFLOP/s with four rows,
  // 100-103 with six (seven or eight: no faster).
  constexpr int R = 6;
  int m0 = 0;
  for (; m0 + R <= M; m0 += R)
    row_block<T, R>(N, K, alpha, A + m0 * a_row, a_row, a_col, B, ldb, C + std::ptrdiff_t(m0) * ldc,
                    ldc, accumulate);
  const T* a = A + m0 * a_row;
  T* c = C + std::ptrdiff_t(m0) * ldc;
  switch (M - m0) {
    case 5:
      row_block<T, 5>(N, K, alpha, a, a_row, a_col, B, ldb, c, ldc, accumulate);
      break;
    case 4:
      row_block<T, 4>(N, K, alpha, a, a_row, a_col, B, ldb, c, ldc, accumulate);
      break;
    case 3:
      row_block<T, 3>(N, K, alpha, a, a_row, a_col, B, ldb, c, ldc, accumulate);
      break;
    case 2:
      row_block<T, 2>(N, K, alpha, a, a_row, a_col, B, ldb, c, ldc, accumulate);
      break;
    case 1:
      row_block<T, 1>(N, K, alpha, a, a_row, a_col, B, ldb, c, ldc, accumulate);
      break;
    default:
      break;
  }
}

}  // namespace

// One clone per instruction-set level, chosen once at load time by the CPU's features.
#if defined(__x86_64__)
#define MOETRAIN_TILE_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MOETRAIN_TILE_CLONES
#endif

MOETRAIN_TILE_CLONES
void tile_gemm(int M, int N, int K, float alpha, const float* A, std::ptrdiff_t a_row,
               std::ptrdiff_t a_col, const float* B, int ldb, float* C, int ldc, bool accumulate) {
  tile_gemm_impl(M, N, K, alpha, A, a_row, a_col, B, ldb, C, ldc, accumulate);
}

MOETRAIN_TILE_CLONES
void tile_gemm(int M, int N, int K, double alpha, const double* A, std::ptrdiff_t a_row,
               std::ptrdiff_t a_col, const double* B, int ldb, double* C, int ldc,
               bool accumulate) {
  tile_gemm_impl(M, N, K, alpha, A, a_row, a_col, B, ldb, C, ldc, accumulate);
}

}  // namespace moetrain::cpu
