// kernels/grouped_gemm.cu — grouped GEMM on mma.sync (contract: grouped_gemm.cuh).
//
// Blocks of 4 warps compute 64 x 64 tiles of C; warp w owns rows 16 w .. 16 w + 15 of the tile and
// all its 64 columns (8 n8 accumulators). The grid is (the most row tiles any split of `rows` into
// `groups` can need, N / 64): block x walks the offsets to find its group and row tile (tiles of
// group g: ceil(rows_g / 64)), and blocks past the last tile return. K advances 32 at a time
// through shared tiles of A [64][32] and B (its [64 n][32 k] rows when stored [N, K], else its
// [32 k][64 n] rows); elements past the group's rows, N or K load as zero, so any shape works.
#include "grouped_gemm.cuh"

#include <stdexcept>
#include <string>
#include <type_traits>

#include "mma.cuh"
#include "pack.cuh"

namespace moetrain::kernels {
namespace grouped_detail {

constexpr int kBM = 64, kBN = 64, kBK = 32, kWarps = 4, kThreads = kWarps * kWarpSize;
constexpr int kLdA = kBK + 8;  // row strides in elements: 16-byte rows, shifted banks
constexpr int kLdBt = kBK + 8, kLdB = kBN + 8;

// Stores a warp's 16 x 64 accumulator (rows row0 .. row0 + 15 of C, columns col0 ..): C = alpha
// acc + beta C (beta = 0 does not read C), rows at or past row_end and columns at or past N
// skipped. Thread 4 g + t holds rows g and g + 8, columns 2 t and 2 t + 1 of each n8.
template <typename TC>
__device__ __forceinline__ void store_tile(TC* C, int ldc, int row0, int row_end, int col0, int N,
                                           const float (&acc)[kBN / 8][4], float alpha,
                                           float beta) {
  const int lane = static_cast<int>(lane_id()), g4 = lane / 4, t4 = lane % 4;
  for (int half = 0; half < 2; ++half) {
    const int r = row0 + g4 + 8 * half;
    if (r >= row_end) continue;
    for (int n = 0; n < kBN / 8; ++n)
      for (int e = 0; e < 2; ++e) {
        const int c = col0 + n * 8 + 2 * t4 + e;
        if (c >= N) continue;
        TC* dst = C + static_cast<std::size_t>(r) * ldc + c;
        float v = alpha * acc[n][2 * half + e];
        if (beta != 0.0f) v += beta * to_float(*dst);
        *dst = from_float<TC>(v);
      }
  }
}

template <typename TC, bool kTransB>
__global__ void __launch_bounds__(kThreads)
    grouped_gemm_kernel(int N, int K, float alpha, const __nv_bfloat16* __restrict__ A, int lda,
                        const __nv_bfloat16* __restrict__ B, int ldb, std::size_t stride_b,
                        float beta, TC* __restrict__ C, int ldc,
                        const std::int32_t* __restrict__ offsets, int groups) {
  __shared__ int found[3];  // group, first row, end row of this block's tile
  if (threadIdx.x == 0) {
    int tile = static_cast<int>(blockIdx.x), g = 0;
    found[0] = -1;
    for (; g < groups; ++g) {
      const int lo = offsets[g], hi = offsets[g + 1], tiles = (hi - lo + kBM - 1) / kBM;
      if (tile < tiles) {
        found[0] = g;
        found[1] = lo + tile * kBM;
        found[2] = hi;
        break;
      }
      tile -= tiles;
    }
  }
  __syncthreads();
  if (found[0] < 0) return;  // past the last tile: uniform over the block
  const int g = found[0], row0 = found[1], row_end = found[2];
  const int col0 = static_cast<int>(blockIdx.y) * kBN;
  const __nv_bfloat16* Bg = B + static_cast<std::size_t>(g) * stride_b;

  __shared__ __align__(16) __nv_bfloat16 as[kBM * kLdA];
  __shared__ __align__(16) __nv_bfloat16 bs[kTransB ? kBN * kLdBt : kBK * kLdB];
  const int warp = static_cast<int>(warp_id()), lane = static_cast<int>(lane_id());
  const __nv_bfloat16 zero = float_to_bf16(0.0f);
  float acc[kBN / 8][4];
  for (int n = 0; n < kBN / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

  for (int k0 = 0; k0 < K; k0 += kBK) {
    __syncthreads();  // the previous step's tiles are no longer read
    for (int i = static_cast<int>(threadIdx.x); i < kBM * kBK; i += kThreads) {
      const int r = i / kBK, k = i % kBK, gr = row0 + r, gk = k0 + k;
      as[r * kLdA + k] =
          (gr < row_end && gk < K) ? A[static_cast<std::size_t>(gr) * lda + gk] : zero;
    }
    for (int i = static_cast<int>(threadIdx.x); i < kBN * kBK; i += kThreads) {
      if constexpr (kTransB) {  // B_g stored [N, K]: tile rows are output columns
        const int n = i / kBK, k = i % kBK, gn = col0 + n, gk = k0 + k;
        bs[n * kLdBt + k] = (gn < N && gk < K) ? Bg[static_cast<std::size_t>(gn) * ldb + gk] : zero;
      } else {  // B_g stored [K, N]
        const int k = i / kBN, n = i % kBN, gn = col0 + n, gk = k0 + k;
        bs[k * kLdB + n] = (gn < N && gk < K) ? Bg[static_cast<std::size_t>(gk) * ldb + gn] : zero;
      }
    }
    __syncthreads();
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, as + (warp * 16 + lane % 16) * kLdA + kk * 16 + lane / 16 * 8);
      for (int n = 0; n < kBN / 8; ++n) {
        uint32_t b[2];
        if constexpr (kTransB)
          ldmatrix_x2(b, bs + (n * 8 + lane % 8) * kLdBt + kk * 16 + lane / 8 % 2 * 8);
        else
          ldmatrix_x2_trans(b, bs + (kk * 16 + lane % 16) * kLdB + n * 8);
        mma_m16n8k16_bf16(acc[n], a, b, acc[n]);
      }
    }
  }

  store_tile(C, ldc, row0 + warp * 16, row_end, col0, N, acc, alpha, beta);
}

// The weight gradients: C_g[M, N] += alpha A[rows_g, :M]^T B[rows_g, :N] (grid: M / 64, N / 64,
// groups). Each block walks its group's rows 32 at a time in order, so the sum over rows has one
// fixed order: deterministic without atomics. A group without rows adds nothing.
template <typename TC>
__global__ void __launch_bounds__(kThreads)
    grouped_wgrad_kernel(int M, int N, float alpha, const __nv_bfloat16* __restrict__ A, int lda,
                         const __nv_bfloat16* __restrict__ B, int ldb, TC* __restrict__ C, int ldc,
                         std::size_t stride_c, const std::int32_t* __restrict__ offsets) {
  const int g = static_cast<int>(blockIdx.z), lo = offsets[g], hi = offsets[g + 1];
  if (hi <= lo) return;
  const int m0 = static_cast<int>(blockIdx.x) * kBM, n0 = static_cast<int>(blockIdx.y) * kBN;
  constexpr int kLdT = kBM + 8;  // tiles stored [row][m] and [row][n]
  __shared__ __align__(16) __nv_bfloat16 at[kBK * kLdT];
  __shared__ __align__(16) __nv_bfloat16 bt[kBK * kLdT];
  const int warp = static_cast<int>(warp_id()), lane = static_cast<int>(lane_id());
  const __nv_bfloat16 zero = float_to_bf16(0.0f);
  float acc[kBN / 8][4];
  for (int n = 0; n < kBN / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
  for (int r0 = lo; r0 < hi; r0 += kBK) {
    __syncthreads();
    for (int i = static_cast<int>(threadIdx.x); i < kBK * kBM; i += kThreads) {
      const int r = i / kBM, c = i % kBM, gr = r0 + r;
      at[r * kLdT + c] =
          (gr < hi && m0 + c < M) ? A[static_cast<std::size_t>(gr) * lda + m0 + c] : zero;
      bt[r * kLdT + c] =
          (gr < hi && n0 + c < N) ? B[static_cast<std::size_t>(gr) * ldb + n0 + c] : zero;
    }
    __syncthreads();
    for (int kk = 0; kk < kBK / 16; ++kk) {
      // A^T's fragment from the tile stored [row][m]: transposed 8x8 loads (rows kk*16 + 0..15).
      uint32_t a[4];
      ldmatrix_x4_trans(
          a, at + (kk * 16 + lane / 16 * 8 + lane % 8) * kLdT + warp * 16 + lane / 8 % 2 * 8);
      for (int n = 0; n < kBN / 8; ++n) {
        uint32_t b[2];
        ldmatrix_x2_trans(b, bt + (kk * 16 + lane % 16) * kLdT + n * 8);
        mma_m16n8k16_bf16(acc[n], a, b, acc[n]);
      }
    }
  }
  // Accumulated: C_g += alpha acc.
  store_tile(C + static_cast<std::size_t>(g) * stride_c, ldc, m0 + warp * 16, M, n0, N, acc, alpha,
             1.0f);
}

}  // namespace grouped_detail

template <typename TC>
void grouped_gemm(bool trans_b, int rows, int N, int K, float alpha, const __nv_bfloat16* A,
                  int lda, const __nv_bfloat16* B, int ldb, std::size_t stride_b, float beta, TC* C,
                  int ldc, const std::int32_t* offsets, int groups, cudaStream_t stream) {
  using namespace grouped_detail;
  if (rows <= 0 || N <= 0 || groups <= 0) return;
  if (K <= 0)
    throw std::invalid_argument("grouped_gemm: K = " + std::to_string(K) +
                                " (an empty sum is the backend's to scale)");
  // Each group adds at most one partial row tile to the tiles of `rows` rows.
  const long long tiles = (static_cast<long long>(rows) + kBM - 1) / kBM + groups;
  if (tiles > 2147483647ll || (N + kBN - 1) / kBN > 65535)
    throw std::invalid_argument("grouped_gemm: too many tiles (rows " + std::to_string(rows) +
                                ", N " + std::to_string(N) + ")");
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>((N + kBN - 1) / kBN));
  if (trans_b)
    launch(grouped_gemm_kernel<TC, true>, grid, dim3(kThreads), 0, stream, N, K, alpha, A, lda, B,
           ldb, stride_b, beta, C, ldc, offsets, groups);
  else
    launch(grouped_gemm_kernel<TC, false>, grid, dim3(kThreads), 0, stream, N, K, alpha, A, lda, B,
           ldb, stride_b, beta, C, ldc, offsets, groups);
}

template <typename TC>
void grouped_gemm_wgrad(int M, int N, float alpha, const __nv_bfloat16* A, int lda,
                        const __nv_bfloat16* B, int ldb, TC* C, int ldc, std::size_t stride_c,
                        const std::int32_t* offsets, int groups, cudaStream_t stream) {
  using namespace grouped_detail;
  if (M <= 0 || N <= 0 || groups <= 0) return;
  if ((M + kBM - 1) / kBM > 65535 || (N + kBN - 1) / kBN > 65535 || groups > 65535)
    throw std::invalid_argument("grouped_gemm_wgrad: M " + std::to_string(M) + ", N " +
                                std::to_string(N) + " or " + std::to_string(groups) +
                                " groups too large for the grid");
  const dim3 grid(static_cast<unsigned>((M + kBM - 1) / kBM),
                  static_cast<unsigned>((N + kBN - 1) / kBN), static_cast<unsigned>(groups));
  launch(grouped_wgrad_kernel<TC>, grid, dim3(kThreads), 0, stream, M, N, alpha, A, lda, B, ldb, C,
         ldc, stride_c, offsets);
}

#define MOETRAIN_GROUPED_GEMM(TC)                                                         \
  template void grouped_gemm<TC>(bool, int, int, int, float, const __nv_bfloat16*, int,   \
                                 const __nv_bfloat16*, int, std::size_t, float, TC*, int, \
                                 const std::int32_t*, int, cudaStream_t);                 \
  template void grouped_gemm_wgrad<TC>(int, int, float, const __nv_bfloat16*, int,        \
                                       const __nv_bfloat16*, int, TC*, int, std::size_t,  \
                                       const std::int32_t*, int, cudaStream_t);
MOETRAIN_GROUPED_GEMM(float)
MOETRAIN_GROUPED_GEMM(__nv_bfloat16)
#undef MOETRAIN_GROUPED_GEMM

}  // namespace moetrain::kernels
