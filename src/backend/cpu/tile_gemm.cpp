#include "backend/cpu/tile_gemm.hpp"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "backend/cpu/bf16.hpp"

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

// The last rows of a product, fewer than a full block: R of them, or fewer.
template <typename T, int R>
inline __attribute__((always_inline)) void rest_rows(int rows, int N, int K, T alpha, const T* A,
                                                     std::ptrdiff_t a_row, std::ptrdiff_t a_col,
                                                     const T* B, int ldb, T* C, int ldc,
                                                     bool accumulate) {
  if (rows == R)
    row_block<T, R>(N, K, alpha, A, a_row, a_col, B, ldb, C, ldc, accumulate);
  else if constexpr (R > 1)
    rest_rows<T, R - 1>(rows, N, K, alpha, A, a_row, a_col, B, ldb, C, ldc, accumulate);
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
  if (M > m0)
    rest_rows<T, R - 1>(M - m0, N, K, alpha, A + m0 * a_row, a_row, a_col, B, ldb,
                        C + std::ptrdiff_t(m0) * ldc, ldc, accumulate);
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

namespace {

// R rows of C times V vectors of 16 columns, the last vector masked to `last` columns' lanes.
template <int R, int V>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), always_inline)) inline void
bf16_block(int K2, float alpha, const std::uint32_t* A, int lda, const std::uint32_t* B, int ldb,
           float* C, int ldc, bool accumulate, __mmask16 last) {
  __m512 acc[R][V];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < V; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int p = 0; p < K2; ++p) {
    const std::uint32_t* b = B + std::ptrdiff_t(p) * ldb;
    __m512bh bv[V];
    for (int j = 0; j < V; ++j)
      bv[j] = (__m512bh)_mm512_maskz_loadu_epi32(j == V - 1 ? last : __mmask16(0xffff), b + 16 * j);
    for (int i = 0; i < R; ++i) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(int(A[std::ptrdiff_t(i) * lda + p]));
      for (int j = 0; j < V; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, bv[j]);
    }
  }
  const __m512 al = _mm512_set1_ps(alpha);
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < V; ++j) {
      const __mmask16 m = j == V - 1 ? last : __mmask16(0xffff);
      float* c = C + std::ptrdiff_t(i) * ldc + 16 * j;
      const __m512 v = accumulate ? _mm512_fmadd_ps(al, acc[i][j], _mm512_maskz_loadu_ps(m, c))
                                  : _mm512_mul_ps(al, acc[i][j]);
      _mm512_mask_storeu_ps(c, m, v);
    }
}

template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), always_inline)) inline void
bf16_rows(int N, int K2, float alpha, const std::uint32_t* A, int lda, const std::uint32_t* B,
          int ldb, float* C, int ldc, bool accumulate) {
  int n0 = 0;
  for (; n0 + 64 <= N; n0 += 64)
    bf16_block<R, 4>(K2, alpha, A, lda, B + n0, ldb, C + n0, ldc, accumulate, 0xffff);
  const int rest = N - n0;
  if (rest == 0) return;
  const int vecs = (rest + 15) / 16;
  const __mmask16 last = __mmask16((1u << (rest - 16 * (vecs - 1))) - 1u);
  switch (vecs) {
    case 4:
      bf16_block<R, 4>(K2, alpha, A, lda, B + n0, ldb, C + n0, ldc, accumulate, last);
      break;
    case 3:
      bf16_block<R, 3>(K2, alpha, A, lda, B + n0, ldb, C + n0, ldc, accumulate, last);
      break;
    case 2:
      bf16_block<R, 2>(K2, alpha, A, lda, B + n0, ldb, C + n0, ldc, accumulate, last);
      break;
    default:
      bf16_block<R, 1>(K2, alpha, A, lda, B + n0, ldb, C + n0, ldc, accumulate, last);
      break;
  }
}

// The last rows < 6 of a product: R of them, or fewer.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), always_inline)) inline void
bf16_rest_rows(int rows, int N, int K2, float alpha, const std::uint32_t* A, int lda,
               const std::uint32_t* B, int ldb, float* C, int ldc, bool accumulate) {
  if (rows == R)
    bf16_rows<R>(N, K2, alpha, A, lda, B, ldb, C, ldc, accumulate);
  else if constexpr (R > 1)
    bf16_rest_rows<R - 1>(rows, N, K2, alpha, A, lda, B, ldb, C, ldc, accumulate);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void tile_gemm_bf16_avx512(
    int M, int N, int K2, float alpha, const std::uint32_t* A, int lda, const std::uint32_t* B,
    int ldb, float* C, int ldc, bool accumulate) {
  int m0 = 0;
  for (; m0 + 6 <= M; m0 += 6)
    bf16_rows<6>(N, K2, alpha, A + std::ptrdiff_t(m0) * lda, lda, B, ldb,
                 C + std::ptrdiff_t(m0) * ldc, ldc, accumulate);
  if (M > m0)
    bf16_rest_rows<5>(M - m0, N, K2, alpha, A + std::ptrdiff_t(m0) * lda, lda, B, ldb,
                      C + std::ptrdiff_t(m0) * ldc, ldc, accumulate);
}

// vdpbf16ps's arithmetic one element at a time: the odd product, then the even one.
void tile_gemm_bf16_portable(int M, int N, int K2, float alpha, const std::uint32_t* A, int lda,
                             const std::uint32_t* B, int ldb, float* C, int ldc, bool accumulate) {
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float s = 0.0f;
      for (int p = 0; p < K2; ++p) {
        const std::uint32_t a = A[std::ptrdiff_t(m) * lda + p], b = B[std::ptrdiff_t(p) * ldb + n];
        s += from_bf16(std::uint16_t(a >> 16)) * from_bf16(std::uint16_t(b >> 16));
        s += from_bf16(std::uint16_t(a)) * from_bf16(std::uint16_t(b));
      }
      float& c = C[std::ptrdiff_t(m) * ldc + n];
      c = accumulate ? std::fma(alpha, s, c) : alpha * s;  // one rounding, as the vector form
    }
}

}  // namespace

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__)
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  }();
  return has;
#else
  return false;
#endif
}

void tile_gemm_bf16(int M, int N, int K2, float alpha, const std::uint32_t* A, int lda,
                    const std::uint32_t* B, int ldb, float* C, int ldc, bool accumulate,
                    bool hardware) {
  if (hardware && !cpu_has_avx512_bf16())
    throw std::invalid_argument("tile_gemm_bf16: this CPU has no AVX-512-BF16");
  if (hardware)
    tile_gemm_bf16_avx512(M, N, K2, alpha, A, lda, B, ldb, C, ldc, accumulate);
  else
    tile_gemm_bf16_portable(M, N, K2, alpha, A, lda, B, ldb, C, ldc, accumulate);
}

void tile_gemm_bf16(int M, int N, int K2, float alpha, const std::uint32_t* A, int lda,
                    const std::uint32_t* B, int ldb, float* C, int ldc, bool accumulate) {
  tile_gemm_bf16(M, N, K2, alpha, A, lda, B, ldb, C, ldc, accumulate, cpu_has_avx512_bf16());
}

template <typename X>
void pack_pairs_a(std::uint32_t* dst, int ldd, const X* x, std::ptrdiff_t is, std::ptrdiff_t js,
                  int rows, int k) {
  const int pairs = (k + 1) / 2;
  if (is == 1 && js != 1) {  // x read transposed: walk its rows (pairs) and write columns of dst
    for (int p = 0; p < pairs; ++p) {
      const X* x0 = x + 2 * p * js;
      const X* x1 = x0 + js;
      const bool pad = 2 * p + 1 >= k;
      for (int r = 0; r < rows; ++r)
        dst[std::ptrdiff_t(r) * ldd + p] = bf16_pair(x0[r], pad ? X(0.0f) : x1[r]);
    }
    return;
  }
  for (int r = 0; r < rows; ++r) {
    const X* row = x + r * is;
    std::uint32_t* d = dst + std::ptrdiff_t(r) * ldd;
    if (js == 1) {  // a contiguous row: its bf16 values in order are the pairs (low half first)
      typedef std::uint16_t half __attribute__((may_alias));
      half* h = reinterpret_cast<half*>(d);
      for (int c = 0; c < k / 2 * 2; ++c) h[c] = bf16_bits(row[c]);
    } else {
      for (int p = 0; p < k / 2; ++p) d[p] = bf16_pair(row[2 * p * js], row[(2 * p + 1) * js]);
    }
    if (k % 2) d[pairs - 1] = bf16_pair(row[(k - 1) * js], 0.0f);
  }
}

template <typename X>
void pack_pairs_b(std::uint32_t* dst, int ldd, const X* x, std::ptrdiff_t is, std::ptrdiff_t js,
                  int k, int cols) {
  for (int p = 0; p < k / 2; ++p) {
    const X* r0 = x + 2 * p * is;
    const X* r1 = r0 + is;
    std::uint32_t* d = dst + std::ptrdiff_t(p) * ldd;
    if (js == 1)  // two contiguous rows interleaved
      for (int n = 0; n < cols; ++n) d[n] = bf16_pair(r0[n], r1[n]);
    else
      for (int n = 0; n < cols; ++n) d[n] = bf16_pair(r0[n * js], r1[n * js]);
  }
  if (k % 2) {
    const X* r0 = x + (k - 1) * is;
    std::uint32_t* d = dst + std::ptrdiff_t(k / 2) * ldd;
    for (int n = 0; n < cols; ++n) d[n] = bf16_pair(r0[n * js], 0.0f);
  }
}

template void pack_pairs_a(std::uint32_t*, int, const float*, std::ptrdiff_t, std::ptrdiff_t, int,
                           int);
template void pack_pairs_a(std::uint32_t*, int, const bf16*, std::ptrdiff_t, std::ptrdiff_t, int,
                           int);
template void pack_pairs_b(std::uint32_t*, int, const float*, std::ptrdiff_t, std::ptrdiff_t, int,
                           int);
template void pack_pairs_b(std::uint32_t*, int, const bf16*, std::ptrdiff_t, std::ptrdiff_t, int,
                           int);

}  // namespace moetrain::cpu
