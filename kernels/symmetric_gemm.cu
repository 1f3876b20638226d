// kernels/symmetric_gemm.cu — batched symmetric GEMM on mma.sync (contract: symmetric_gemm.cuh).
//
// Blocks of 4 warps compute 64 x 64 tiles (tile_row, tile_col) of D_b with tile_row <= tile_col;
// warp w owns rows 16 w .. 16 w + 15 of the tile and all its 64 columns (8 n8 accumulators). The
// grid is (n_tiles (n_tiles + 1) / 2, batch): block x is the upper tile t = tile_col (tile_col + 1)
// / 2 + tile_row (the upper triangle column by column), block y the matrix. Both operands are rows
// of op(X): the A tile is rows 64 tile_row .. of op(X), the B tile (op(X)^T's columns) rows
// 64 tile_col ..; a diagonal tile loads one and uses it for both. K advances 32 at a time through
// shared tiles stored as X is: [64 rows][32 k] when trans = false (A by ldmatrix, B as the
// transposed Bt by ldmatrix), [32 k][64 rows] when trans = true (A^T's fragments by transposed
// ldmatrix, B as a row-major K x N tile); elements past n or k load as zero, so any shape works.
// The epilogue stores each value with r <= c at (r, c) and (c, r) (a diagonal tile's values with
// r > c are dropped: the thread holding (c, r) stores them), so D is bitwise symmetric.
#include "symmetric_gemm.cuh"

#include <stdexcept>
#include <string>
#include <type_traits>

#include "mma.cuh"
#include "pack.cuh"

namespace moetrain::kernels {
namespace symmetric_detail {

constexpr int kBT = 64, kBK = 32, kWarps = 4, kThreads = kWarps * kWarpSize;
// Row strides in elements of the shared tiles ([64][32] and [32][64]): 16-byte rows, shifted banks.
constexpr int kLdRows = kBK + 8, kLdCols = kBT + 8;

// The bf16 that goes into shared memory: fp32 rounded to nearest even, bf16 as it is.
template <typename TX>
__device__ __forceinline__ __nv_bfloat16 as_bf16(TX v) {
  if constexpr (std::is_same_v<TX, float>) {
    return float_to_bf16(v);
  } else {
    return v;
  }
}

// Loads rows row0 .. row0 + 63, columns k0 .. k0 + 31 of op(X) (n x K) into a shared tile: as
// [row][k] when X is stored [n, K] (kTrans = false), as [k][row] when stored [K, n]; consecutive
// threads read consecutive elements of a stored row. Past n or K: zeros.
template <bool kTrans, typename TX>
__device__ __forceinline__ void load_tile(__nv_bfloat16* tile, const TX* __restrict__ X, int ldx,
                                          int row0, int n, int k0, int K) {
  const __nv_bfloat16 zero = float_to_bf16(0.0f);
  for (int i = static_cast<int>(threadIdx.x); i < kBT * kBK; i += kThreads) {
    if constexpr (kTrans) {
      const int k = i / kBT, r = i % kBT, gr = row0 + r, gk = k0 + k;
      tile[k * kLdCols + r] =
          (gr < n && gk < K) ? as_bf16(X[static_cast<std::size_t>(gk) * ldx + gr]) : zero;
    } else {
      const int r = i / kBK, k = i % kBK, gr = row0 + r, gk = k0 + k;
      tile[r * kLdRows + k] =
          (gr < n && gk < K) ? as_bf16(X[static_cast<std::size_t>(gr) * ldx + gk]) : zero;
    }
  }
}

// Upper tile t of the triangle taken column by column: t = col (col + 1) / 2 + row, row <= col.
// The float square root is within one of col for every t < 2^31; the loops correct it.
__device__ __forceinline__ void upper_tile(unsigned t, int& row, int& col) {
  long long c = static_cast<long long>((sqrtf(8.0f * static_cast<float>(t) + 1.0f) - 1.0f) * 0.5f);
  while (c > 0 && c * (c + 1) / 2 > t) --c;
  while ((c + 1) * (c + 2) / 2 <= t) ++c;
  col = static_cast<int>(c);
  row = static_cast<int>(t - c * (c + 1) / 2);
}

// Stores a warp's 16 x 64 accumulator (rows row0 .. row0 + 15 of D, columns col0 ..): for each
// value with r <= c < n, v = alpha acc + beta C[r, c] (beta = 0 does not read C) + shift [r = c],
// stored at D[r, c] and D[c, r]. The thread that reads C[r, c] writes both, and no thread reads
// C below the diagonal, so C may be D. Thread 4 g + t holds rows g and g + 8, columns 2 t and
// 2 t + 1 of each n8. Values with c < r (only in a diagonal tile) are dropped: their mirror is
// stored by the thread holding (c, r).
template <typename TD>
__device__ __forceinline__ void store_symmetric(TD* D, int ldd, const TD* C, int ldc, int n,
                                                int row0, int col0, const float (&acc)[kBT / 8][4],
                                                float alpha, float beta, float shift) {
  const int lane = static_cast<int>(lane_id()), g4 = lane / 4, t4 = lane % 4;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = row0 + g4 + 8 * half;
    if (r >= n) continue;
#pragma unroll
    for (int j = 0; j < kBT / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = col0 + j * 8 + 2 * t4 + e;
        if (c >= n || c < r) continue;
        float v = alpha * acc[j][2 * half + e];
        if (beta != 0.0f) v += beta * to_float(C[static_cast<std::size_t>(r) * ldc + c]);
        if (r == c) v += shift;
        const TD out = from_float<TD>(v);
        D[static_cast<std::size_t>(r) * ldd + c] = out;
        if (r != c) D[static_cast<std::size_t>(c) * ldd + r] = out;
      }
  }
}

// C and D may be the same matrices: neither is __restrict__.
template <typename TX, typename TD, bool kTrans>
__global__ void __launch_bounds__(kThreads)
    symmetric_gemm_kernel(int n, int K, float alpha, const TX* __restrict__ X, int ldx,
                          std::size_t stride_x, float beta, const TD* C, int ldc,
                          std::size_t stride_c, float shift, TD* D, int ldd, std::size_t stride_d) {
  int tile_row, tile_col;
  upper_tile(blockIdx.x, tile_row, tile_col);
  const std::size_t b = blockIdx.y;
  const TX* Xb = X + b * stride_x;
  const int row0 = tile_row * kBT, col0 = tile_col * kBT;
  const bool diagonal = tile_row == tile_col;  // uniform over the block

  constexpr int kTile = kTrans ? kBK * kLdCols : kBT * kLdRows;  // elements of a shared tile
  __shared__ __align__(16) __nv_bfloat16 as[kTile];
  __shared__ __align__(16) __nv_bfloat16 bs[kTile];
  const __nv_bfloat16* bt = diagonal ? as : bs;
  const int warp = static_cast<int>(warp_id()), lane = static_cast<int>(lane_id());
  float acc[kBT / 8][4];
  for (int j = 0; j < kBT / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

  for (int k0 = 0; k0 < K; k0 += kBK) {
    __syncthreads();  // the previous step's tiles are no longer read
    load_tile<kTrans>(as, Xb, ldx, row0, n, k0, K);
    if (!diagonal) load_tile<kTrans>(bs, Xb, ldx, col0, n, k0, K);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t a[4];
      if constexpr (kTrans)  // A^T's fragment from the tile stored [k][row]: transposed loads
        ldmatrix_x4_trans(
            a, as + (kk * 16 + lane / 16 * 8 + lane % 8) * kLdCols + warp * 16 + lane / 8 % 2 * 8);
      else
        ldmatrix_x4(a, as + (warp * 16 + lane % 16) * kLdRows + kk * 16 + lane / 16 * 8);
#pragma unroll
      for (int j = 0; j < kBT / 8; ++j) {
        uint32_t bf[2];
        if constexpr (kTrans)  // B = op(X)^T is the tile [k][col] as it is: row-major K x N
          ldmatrix_x2_trans(bf, bt + (kk * 16 + lane % 16) * kLdCols + j * 8);
        else  // the tile [col][k] is B stored transposed (N x K)
          ldmatrix_x2(bf, bt + (j * 8 + lane % 8) * kLdRows + kk * 16 + lane / 8 % 2 * 8);
        mma_m16n8k16_bf16(acc[j], a, bf, acc[j]);
      }
    }
  }

  const TD* Cb = beta != 0.0f ? C + b * stride_c : nullptr;  // C may be null when beta = 0
  store_symmetric(D + b * stride_d, ldd, Cb, ldc, n, row0 + warp * 16, col0, acc, alpha, beta,
                  shift);
}

}  // namespace symmetric_detail

template <typename TX, typename TD>
void symmetric_gemm_batched(bool trans, int n, int k, float alpha, const TX* X, int ldx,
                            std::size_t stride_x, float beta, const TD* C, int ldc,
                            std::size_t stride_c, float shift, TD* D, int ldd, std::size_t stride_d,
                            int batch, cudaStream_t stream) {
  using namespace symmetric_detail;
  if (n <= 0 || batch <= 0) return;
  if (k <= 0)
    throw std::invalid_argument("symmetric_gemm_batched: k = " + std::to_string(k) +
                                " (an empty sum is the caller's to scale)");
  if (beta != 0.0f && C == nullptr)
    throw std::invalid_argument("symmetric_gemm_batched: beta != 0 without C");
  const long long n_tiles = (static_cast<long long>(n) + kBT - 1) / kBT;
  const long long tiles = n_tiles * (n_tiles + 1) / 2;
  if (tiles > 2147483647ll)
    throw std::invalid_argument("symmetric_gemm_batched: n = " + std::to_string(n) + " needs " +
                                std::to_string(tiles) +
                                " upper tiles, more than a grid's 2^31 - 1 blocks");
  if (batch > 65535)
    throw std::invalid_argument("symmetric_gemm_batched: batch = " + std::to_string(batch) +
                                " is more than a grid's 65535");
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(batch));
  if (trans)
    launch(symmetric_gemm_kernel<TX, TD, true>, grid, dim3(kThreads), 0, stream, n, k, alpha, X,
           ldx, stride_x, beta, C, ldc, stride_c, shift, D, ldd, stride_d);
  else
    launch(symmetric_gemm_kernel<TX, TD, false>, grid, dim3(kThreads), 0, stream, n, k, alpha, X,
           ldx, stride_x, beta, C, ldc, stride_c, shift, D, ldd, stride_d);
}

#define MOETRAIN_SYMMETRIC_GEMM(TX, TD)                                                            \
  template void symmetric_gemm_batched<TX, TD>(bool, int, int, float, const TX*, int, std::size_t, \
                                               float, const TD*, int, std::size_t, float, TD*,     \
                                               int, std::size_t, int, cudaStream_t);
MOETRAIN_SYMMETRIC_GEMM(float, float)
MOETRAIN_SYMMETRIC_GEMM(__nv_bfloat16, __nv_bfloat16)
MOETRAIN_SYMMETRIC_GEMM(float, __nv_bfloat16)
MOETRAIN_SYMMETRIC_GEMM(__nv_bfloat16, float)
#undef MOETRAIN_SYMMETRIC_GEMM

}  // namespace moetrain::kernels
