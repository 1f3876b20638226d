// tests/simt/mma_test_kernels.cu — test kernels of kernels/mma.cuh, written like kernels/*.cu.
// The simulator build compiles them with the other test kernels; the CUDA build compiles them for
// every architecture into moetrain_gpu_test_kernels (linked by moetrain_gpu_tests) and into
// moetrain_cuda_link_check.
#include "mma_test_kernels.hpp"

#include "mma.cuh"

namespace moetrain::mma_test {

using kernels::ceil_div;
using kernels::dynamic_smem;
using kernels::launch;
using kernels::ldmatrix_x1;
using kernels::ldmatrix_x1_trans;
using kernels::ldmatrix_x2;
using kernels::ldmatrix_x2_trans;
using kernels::ldmatrix_x4;
using kernels::ldmatrix_x4_trans;
using kernels::mma_m16n8k16_bf16;

// ---- fragments ----------------------------------------------------------------------------------
__global__ void mma_fragments_kernel(const uint32_t* __restrict__ a, const uint32_t* __restrict__ b,
                                     const float* __restrict__ c, float* __restrict__ d,
                                     bool in_place) {
  const unsigned x = threadIdx.x;
  uint32_t fa[4], fb[2];  // fragments of A (16x16 bf16) and B (16x8 bf16)
  float fc[4], fd[4];     // fragments of C and D (16x8 fp32)
  for (int i = 0; i < 4; ++i) fa[i] = a[4 * x + i];
  for (int i = 0; i < 2; ++i) fb[i] = b[2 * x + i];
  for (int i = 0; i < 4; ++i) fc[i] = c[4 * x + i];
  if (in_place) {  // the same for every lane: one instruction per branch, as .aligned requires
    mma_m16n8k16_bf16(fc, fa, fb, fc);
    for (int i = 0; i < 4; ++i) d[4 * x + i] = fc[i];
  } else {
    mma_m16n8k16_bf16(fd, fa, fb, fc);
    for (int i = 0; i < 4; ++i) d[4 * x + i] = fd[i];
  }
}
void mma_fragments(const uint32_t* a, const uint32_t* b, const float* c, float* d, int warps,
                   bool in_place, cudaStream_t stream) {
  launch(mma_fragments_kernel, dim3(1), dim3(32 * warps), 0, stream, a, b, c, d, in_place);
}

template <Ldmatrix kVariant>
__device__ __forceinline__ void ldmatrix_store(const void* row, uint32_t* out) {
  uint32_t r[matrices(kVariant)];  // this lane's fragment of each 8x8 matrix
  if constexpr (kVariant == Ldmatrix::X1) ldmatrix_x1(r, row);
  if constexpr (kVariant == Ldmatrix::X2) ldmatrix_x2(r, row);
  if constexpr (kVariant == Ldmatrix::X4) ldmatrix_x4(r, row);
  if constexpr (kVariant == Ldmatrix::X1Trans) ldmatrix_x1_trans(r, row);
  if constexpr (kVariant == Ldmatrix::X2Trans) ldmatrix_x2_trans(r, row);
  if constexpr (kVariant == Ldmatrix::X4Trans) ldmatrix_x4_trans(r, row);
  for (int q = 0; q < matrices(kVariant); ++q) out[q] = r[q];
}

template <Ldmatrix kVariant>
__global__ void ldmatrix_kernel(const uint16_t* __restrict__ src, int smem_elems,
                                const int* __restrict__ row_offset, uint32_t* __restrict__ out,
                                bool from_global) {
  uint16_t* smem = dynamic_smem<uint16_t>();
  for (int i = static_cast<int>(threadIdx.x); i < smem_elems; i += static_cast<int>(blockDim.x))
    smem[i] = src[i];
  __syncthreads();
  const unsigned lane = threadIdx.x;
  ldmatrix_store<kVariant>((from_global ? src : smem) + row_offset[lane], out + 4 * lane);
}
void ldmatrix_fragments(Ldmatrix variant, const uint16_t* src, int smem_elems,
                        const int* row_offset, uint32_t* out, bool from_global,
                        cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(smem_elems) * sizeof(uint16_t);
  switch (variant) {
    case Ldmatrix::X1:
      launch(ldmatrix_kernel<Ldmatrix::X1>, dim3(1), dim3(32), smem, stream, src, smem_elems,
             row_offset, out, from_global);
      break;
    case Ldmatrix::X2:
      launch(ldmatrix_kernel<Ldmatrix::X2>, dim3(1), dim3(32), smem, stream, src, smem_elems,
             row_offset, out, from_global);
      break;
    case Ldmatrix::X4:
      launch(ldmatrix_kernel<Ldmatrix::X4>, dim3(1), dim3(32), smem, stream, src, smem_elems,
             row_offset, out, from_global);
      break;
    case Ldmatrix::X1Trans:
      launch(ldmatrix_kernel<Ldmatrix::X1Trans>, dim3(1), dim3(32), smem, stream, src, smem_elems,
             row_offset, out, from_global);
      break;
    case Ldmatrix::X2Trans:
      launch(ldmatrix_kernel<Ldmatrix::X2Trans>, dim3(1), dim3(32), smem, stream, src, smem_elems,
             row_offset, out, from_global);
      break;
    case Ldmatrix::X4Trans:
      launch(ldmatrix_kernel<Ldmatrix::X4Trans>, dim3(1), dim3(32), smem, stream, src, smem_elems,
             row_offset, out, from_global);
      break;
  }
}

// ---- GEMM ---------------------------------------------------------------------------------------
constexpr int kTileM = 32, kTileN = 32, kTileK = 16;  // block tile of C, K step
constexpr int kGemmThreads = 128;  // four warps, each a 16x16 quarter of the tile
// Row padding of the shared tiles: keeps every row 16-byte aligned for ldmatrix (48- and 80-byte
// rows) while spreading a matrix's 8 rows over different banks.
constexpr int kPad = 8;

template <GemmB kB>
__global__ void __launch_bounds__(kGemmThreads)
    gemm_bf16_kernel(const __nv_bfloat16* __restrict__ A, const __nv_bfloat16* __restrict__ B,
                     float* __restrict__ C, int M, int N, int K) {
  constexpr bool kBt = kB == GemmB::X2Transposed;  // B holds B^T (N x K), and so does its tile
  constexpr int kBRows = kBt ? kTileN : kTileK, kBCols = (kBt ? kTileK : kTileN) + kPad;
  __shared__ __align__(16) __nv_bfloat16 As[kTileM][kTileK + kPad];  // A tile, M x K, row-major
  __shared__ __align__(16) __nv_bfloat16 Bs[kBRows][kBCols];         // B tile, K x N (N x K if kBt)
  const unsigned tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
  const int m0 = static_cast<int>(blockIdx.y) * kTileM, n0 = static_cast<int>(blockIdx.x) * kTileN;
  const int wm = static_cast<int>(warp >> 1) * 16, wn = static_cast<int>(warp & 1u) * 16;
  const int l16 = static_cast<int>(lane % 16), l8 = static_cast<int>(lane % 8);
  const int hi8 = static_cast<int>(lane / 16 * 8), mat8 = static_cast<int>(lane / 8 % 2 * 8);
  float acc[2][4] = {};  // D fragments (16x8 fp32) of columns wn..wn+7 and wn+8..wn+15
  const __nv_bfloat16 zero = kernels::float_to_bf16(0.0f);
  for (int k0 = 0; k0 < K; k0 += kTileK) {
    for (int i = static_cast<int>(tid); i < kTileM * kTileK; i += kGemmThreads) {
      const int r = i / kTileK, c = i % kTileK, gm = m0 + r, gk = k0 + c;
      As[r][c] = gm < M && gk < K ? A[static_cast<size_t>(gm) * K + gk] : zero;
    }
    for (int i = static_cast<int>(tid); i < kTileK * kTileN; i += kGemmThreads) {
      if constexpr (kBt) {
        const int r = i / kTileK, c = i % kTileK, gn = n0 + r, gk = k0 + c;
        Bs[r][c] = gn < N && gk < K ? B[static_cast<size_t>(gn) * K + gk] : zero;
      } else {
        const int r = i / kTileN, c = i % kTileN, gk = k0 + r, gn = n0 + c;
        Bs[r][c] = gk < K && gn < N ? B[static_cast<size_t>(gk) * N + gn] : zero;
      }
    }
    __syncthreads();
    // The recipes of kernels/mma.cuh's header: lane l addresses row l % 16 of the warp's 16 rows
    // of A, columns 0-7 (l < 16) or 8-15, so the four 8x8 matrices come out as a[0..3]; B's
    // fragments of the warp's two 8-column halves come from one x4.trans, two x2.trans, or (B^T
    // tile) two x2 on rows n.
    uint32_t a[4];              // A fragment (16x16 bf16)
    uint32_t b_lo[2], b_hi[2];  // B fragments (16x8 bf16) of columns wn.., wn+8..
    ldmatrix_x4(a, &As[wm + l16][hi8]);
    if constexpr (kB == GemmB::X4Trans) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, &Bs[l16][wn + hi8]);
      b_lo[0] = b[0];
      b_lo[1] = b[1];
      b_hi[0] = b[2];
      b_hi[1] = b[3];
    } else if constexpr (kB == GemmB::X2Trans) {
      ldmatrix_x2_trans(b_lo, &Bs[l16][wn]);
      ldmatrix_x2_trans(b_hi, &Bs[l16][wn + 8]);
    } else {
      ldmatrix_x2(b_lo, &Bs[wn + l8][mat8]);
      ldmatrix_x2(b_hi, &Bs[wn + 8 + l8][mat8]);
    }
    mma_m16n8k16_bf16(acc[0], a, b_lo, acc[0]);
    mma_m16n8k16_bf16(acc[1], a, b_hi, acc[1]);
    __syncthreads();  // every warp has read the tiles before the next step overwrites them
  }
  const int g = static_cast<int>(lane >> 2), t = static_cast<int>(lane & 3u);
  for (int j = 0; j < 2; ++j) {
    for (int i = 0; i < 4; ++i) {
      const int row = m0 + wm + g + 8 * (i >> 1), col = n0 + wn + 8 * j + 2 * t + (i & 1);
      if (row < M && col < N) C[static_cast<size_t>(row) * N + col] = acc[j][i];
    }
  }
}
void gemm_bf16(GemmB variant, const __nv_bfloat16* A, const __nv_bfloat16* B, float* C, int M,
               int N, int K, cudaStream_t stream) {
  if (M == 0 || N == 0) return;  // an empty grid is a launch error
  const dim3 grid(ceil_div(N, kTileN), ceil_div(M, kTileM)), block(kGemmThreads);
  switch (variant) {
    case GemmB::X4Trans:
      launch(gemm_bf16_kernel<GemmB::X4Trans>, grid, block, 0, stream, A, B, C, M, N, K);
      break;
    case GemmB::X2Trans:
      launch(gemm_bf16_kernel<GemmB::X2Trans>, grid, block, 0, stream, A, B, C, M, N, K);
      break;
    case GemmB::X2Transposed:
      launch(gemm_bf16_kernel<GemmB::X2Transposed>, grid, block, 0, stream, A, B, C, M, N, K);
      break;
  }
}

// ---- misuse -------------------------------------------------------------------------------------
__global__ void mma_bug_kernel(MmaBug bug, float* __restrict__ out) {
  const unsigned lane = threadIdx.x & 31u;
  const uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float acc[4] = {1.0f, 1.0f, 1.0f, 1.0f};
  switch (bug) {
    case MmaBug::LaneExits:
      if (lane == 5) return;
      mma_m16n8k16_bf16(acc, a, b, acc);
      break;
    case MmaBug::DivergentBranches:
      if (lane < 16) {
        mma_m16n8k16_bf16(acc, a, b, acc);
      } else {
        mma_m16n8k16_bf16(acc, a, b, acc);
      }
      break;
    case MmaBug::VersusSyncwarp:
      if (lane < 16) {
        mma_m16n8k16_bf16(acc, a, b, acc);
      } else {
        __syncwarp();
      }
      break;
    case MmaBug::PartialWarp:
      mma_m16n8k16_bf16(acc, a, b, acc);
      break;
  }
  out[threadIdx.x] = acc[0];
}
void mma_bug(MmaBug bug, float* out, cudaStream_t stream) {
  launch(mma_bug_kernel, dim3(1), dim3(bug == MmaBug::PartialWarp ? 48 : 32), 0, stream, bug, out);
}

}  // namespace moetrain::mma_test
